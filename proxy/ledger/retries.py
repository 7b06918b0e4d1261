"""Retried calls: recognise the attempts of one call and chain them, so their spend is visible.

The official SDKs resend an identical request and say so in `x-stainless-retry-count` ("0", "1", "2"), with
no idempotency key (anthropic-wire.md §4.2); applications repeat calls without saying anything. Both are found
the same way: the same key sending the same request (as canonical JSON, so key order does not matter). The
work runs in the ledger writer's transaction, off the response path.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from proxy.ledger.schema import UsageRow

# How far back an SDK retry looks for the attempt it repeats: the SDKs' 10-minute timeout plus their backoff.
SDK_RETRY_WINDOW = timedelta(minutes=15)
Chain = tuple[datetime, str, int]  # started_at, id, attempt


def fingerprint(body: bytes | None) -> str | None:
    """SHA-256 of the request's canonical JSON (sorted keys, no spaces); None when there is no JSON object."""
    if not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return fingerprint_request(request)


def fingerprint_request(request: Any, *, user: str | None = None) -> str | None:
    """`fingerprint` of a request already parsed (the gate's, so the body never travels with the record).

    The end user is part of a request's identity: two users sending the same prompt through one key are two
    calls, not a repeat."""
    try:
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return None
    # `surrogatepass`: a lone surrogate (valid JSON, invalid text) is hashed as itself rather than raising.
    if user is not None:
        canonical += "\nuser:" + user
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def link_retries(connection: Connection, rows: list[dict[str, Any]], windows: list[int]) -> None:
    """Mark each row that repeats an earlier call of its key, and chain it to that call (rows are edited in place).

    `windows[i]` is row i's repeat window in seconds (0: only SDK retries are linked). Rows of one batch are
    linked to each other too, oldest first.
    """
    latest: dict[tuple[str, str], Chain] = {}
    for index in sorted(range(len(rows)), key=lambda i: rows[i]["started_at"]):
        row = rows[index]
        key_id, print_ = row["key_id"], row["fingerprint"]
        if key_id is None or print_ is None:
            continue
        sdk_retry = row["retry_count"] > 0
        window = SDK_RETRY_WINDOW if sdk_retry else timedelta(seconds=windows[index])
        if window:
            previous = _previous(connection, latest.get((key_id, print_)), key_id, print_, row["started_at"] - window)
            if previous is not None and previous[0] >= row["started_at"] - window:
                row.update(is_retry=True, retry_reason="sdk" if sdk_retry else "repeat")
                row.update(retry_of=previous[1], attempt=previous[2] + 1)
        if sdk_retry and row["retry_of"] is None:
            # The first attempt is not in the ledger (it never reached spendgate): still a retry.
            row.update(is_retry=True, retry_reason="sdk", attempt=row["retry_count"])
        latest[(key_id, print_)] = (row["started_at"], row["id"], row["attempt"])


def _previous(
    connection: Connection, in_batch: Chain | None, key_id: str, print_: str, since: datetime
) -> Chain | None:
    if in_batch is not None:
        return in_batch
    query = (
        select(UsageRow.started_at, UsageRow.id, UsageRow.attempt)
        .where(UsageRow.key_id == key_id, UsageRow.fingerprint == print_, UsageRow.started_at >= since)
        .order_by(UsageRow.started_at.desc(), UsageRow.seq.desc())
        .limit(1)
    )
    found = connection.execute(query).first()
    return None if found is None else (found[0], found[1], found[2])
