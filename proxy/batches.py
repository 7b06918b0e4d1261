"""Message Batches through the proxy: owned by teams, held against budgets, metered from their results.

The API answers with an absolute `results_url` on api.anthropic.com and both SDKs fetch it as given, which
would bypass the proxy (anthropic-wire.md §5): every batch object we return points it at the proxy instead.
Results are metered as they stream through, one usage record per result, with ids derived from the batch and
`custom_id`, so reading results twice (or the reconciler reading them too) never counts anything twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, Literal

import anyio.to_thread
from sqlalchemy import Engine, insert, or_, select, update

from proxy.budgets import counters_for, settle
from proxy.db import write_transaction
from proxy.keys import KeyInfo, lookup_key_by_id
from proxy.limits import estimate_cost, input_token_bound
from proxy.models import Batch
from proxy.pricing import PriceTable
from proxy.types import Outcome, Reservation, Usage, UsageRecord
from proxy.upstream import Upstream
from proxy.usage import parse_usage

logger = logging.getLogger("spendgate")

BATCHES = "/v1/messages/batches"
ANTHROPIC_VERSION = b"2023-06-01"
BatchKind = Literal["create", "list", "object", "cancel", "delete", "results", "other"]
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class BatchRoute:
    """Which batch operation a request is, and on which batch."""

    kind: BatchKind
    batch_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOwner:
    """What the proxy knows of a batch it created."""

    id: str
    team_id: int
    key_id: str
    hold_call_id: str
    created_at: datetime
    results_recorded: bool


def batch_route(method: str, path: str) -> BatchRoute | None:
    """Recognise the Message Batches endpoints (the query, e.g. `?beta=true`, is not part of `path`)."""
    if path == BATCHES:
        return BatchRoute("create") if method == "POST" else BatchRoute("list") if method == "GET" else None
    if not path.startswith(BATCHES + "/"):
        return None
    batch_id, _, action = path[len(BATCHES) + 1 :].partition("/")
    kinds: dict[tuple[str, str], BatchKind] = {
        ("GET", ""): "object",
        ("DELETE", ""): "delete",
        ("POST", "cancel"): "cancel",
        ("GET", "results"): "results",
    }
    kind = kinds.get((method, action))
    # Anything else under a batch's path still names that batch: it gets the ownership check too.
    return BatchRoute(kind or "other", batch_id or None)


def estimate_batch(request: dict[str, Any], prices: PriceTable, at: datetime) -> Decimal | None:
    """The most a batch can cost: every request's worst case at batch rates; None if any model is unpriced."""
    requests = request.get("requests")
    total = ZERO
    for item in requests if isinstance(requests, list) else ():
        params = item.get("params") if isinstance(item, dict) else None
        if not isinstance(params, dict):
            continue
        max_tokens = params.get("max_tokens")
        estimate = estimate_cost(
            params,
            model=str(params.get("model", "")),
            input_tokens=input_token_bound(params, len(json.dumps(params))),
            max_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else None,
            prices=prices,
            at=at,
            batch=True,
        )
        if estimate is None:
            return None
        total += estimate
    return total


def save_batch(engine: Engine, *, batch_id: str, key: KeyInfo, hold_call_id: str, created_at: datetime) -> None:
    """Remember that this team created this batch (blocking)."""
    with engine.begin() as connection:
        connection.execute(
            insert(Batch).values(
                id=batch_id, team_id=key.team_id, key_id=key.key_id, hold_call_id=hold_call_id, created_at=created_at
            )
        )


def find_batch(engine: Engine, batch_id: str) -> BatchOwner | None:
    """The proxy's record of a batch, or None (blocking)."""
    with engine.connect() as connection:
        row = connection.execute(select(*Batch.__table__.columns).where(Batch.id == batch_id)).first()
    return None if row is None else _owner(row)


def owned_ids(engine: Engine, team_id: int, ids: list[str]) -> set[str]:
    """Which of these batch ids the team created through the proxy (blocking)."""
    if not ids:
        return set()
    with engine.connect() as connection:
        return set(connection.execute(select(Batch.id).where(Batch.team_id == team_id, Batch.id.in_(ids))).scalars())


def claim_unrecorded(engine: Engine, *, now: datetime, lease: timedelta, limit: int = 20) -> list[BatchOwner]:
    """Batches whose results nobody has recorded, each leased to this caller so replicas share the work."""
    claimed = []
    with engine.connect() as connection:
        rows = connection.execute(
            select(*Batch.__table__.columns)
            .where(Batch.results_recorded_at.is_(None), or_(Batch.lease_until.is_(None), Batch.lease_until < now))
            .order_by(Batch.created_at)
            .limit(limit)
        ).all()
        for row in rows:
            won = connection.execute(
                update(Batch)
                .where(Batch.id == row.id, or_(Batch.lease_until.is_(None), Batch.lease_until < now))
                .values(lease_until=now + lease)
            )
            connection.commit()
            if won.rowcount == 1:
                claimed.append(_owner(row))
    return claimed


def release_lease(engine: Engine, batch_id: str) -> None:
    """Give up a reconciler's claim on a batch (blocking)."""
    with engine.begin() as connection:
        connection.execute(update(Batch).where(Batch.id == batch_id).values(lease_until=None))


def point_results_at(body: bytes, public_url: str) -> bytes:
    """Rewrite `results_url` in a batch object, or in every batch of a list, to fetch through the proxy."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    batches = payload.get("data") if payload.get("type") != "message_batch" else [payload]
    for batch in batches if isinstance(batches, list) else ():
        if isinstance(batch, dict) and batch.get("results_url") and isinstance(batch.get("id"), str):
            batch["results_url"] = f"{public_url}{BATCHES}/{batch['id']}/results"
    return json.dumps(payload).encode()


def keep_owned(body: bytes, owned: Callable[[list[str]], set[str]]) -> bytes:
    """Drop from a batch list the batches the caller's team does not own; `owned` answers which ids it does."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or not isinstance(data, list):
        # Never pass on a list we cannot filter: it may name other teams' batches.
        return json.dumps({"data": [], "has_more": False, "first_id": None, "last_id": None}).encode()
    mine = owned([batch["id"] for batch in data if isinstance(batch, dict) and isinstance(batch.get("id"), str)])
    # first_id / last_id stay the upstream's: they are the cursors for the next page, even when this page
    # held none of the team's batches.
    payload["data"] = [batch for batch in data if isinstance(batch, dict) and batch.get("id") in mine]
    return json.dumps(payload).encode()


def result_record_id(batch_id: str, custom_id: str) -> str:
    """A result's usage-record id: the same every time the result is read."""
    return "sgb_" + hashlib.sha256(f"{batch_id}/{custom_id}".encode()).hexdigest()[:24]


def results_meter(
    engine: Engine,
    batch: BatchOwner,
    *,
    reader: KeyInfo | None,
    prices: PriceTable,
    submit: Callable[[UsageRecord], None],
) -> ResultsMeter | None:
    """A meter for a batch's results; spend counts against the key that created the batch (blocking).

    None when that key is gone and no reader of its team stands in for it.
    """
    key = lookup_key_by_id(engine, batch.key_id) or reader
    if key is None:
        return None
    hold = Reservation(
        call_id=batch.hold_call_id, counters=counters_for(key, batch.created_at), amount=ZERO, held=False
    )
    return ResultsMeter(batch, key=key, reservation=hold, prices=prices, submit=submit)


class ResultsMeter:
    """Turns a batch's results JSONL, as it streams past, into one usage record per result.

    The batch's budget hold is released by the record of the last result (a batch has at least one), so spend
    and hold change together, and the ledger writer then marks the batch recorded. An interrupted read releases
    nothing; a later complete read (with the same record ids) finishes the job.
    """

    def __init__(
        self,
        batch: BatchOwner,
        *,
        key: KeyInfo,
        reservation: Reservation,
        prices: PriceTable,
        submit: Callable[[UsageRecord], None],
    ) -> None:
        self._batch = batch
        self._key = key
        self._reservation = reservation
        self._prices = prices
        self._submit = submit
        self._buffer = b""
        self._last: UsageRecord | None = None
        self.results = 0

    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the JSONL body."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line)

    def finish(self, *, complete: bool) -> None:
        """The stream ended; `complete` when it ended normally (then the hold is released with the last record)."""
        if complete and self._buffer.strip():
            self._line(self._buffer)
        self._buffer = b""
        if self._last is not None:
            last = self._last
            if complete:
                last = replace(last, reservation=replace(self._reservation, held=True))
            self._submit(last)
            self._last = None

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            item = json.loads(line)
        except ValueError:
            logger.warning("unreadable line in the results of batch %s", self._batch.id)
            return
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            return
        record = self._record(item["custom_id"], item.get("result"))
        if self._last is not None:
            self._submit(self._last)
        self._last = record
        self.results += 1

    def _record(self, custom_id: str, result: Any) -> UsageRecord:
        result = result if isinstance(result, dict) else {}
        kind = result.get("type")
        message = result.get("message") if kind == "succeeded" else None
        message = message if isinstance(message, dict) else {}
        usage_json = message.get("usage")
        usage = parse_usage(usage_json) if isinstance(usage_json, dict) else None
        model = message.get("model") if isinstance(message.get("model"), str) else None
        outcome: Outcome = "ok" if kind == "succeeded" else "upstream_error"
        error_type = None if kind == "succeeded" else _error_type(result) or str(kind)
        if usage is not None and model is not None:
            cost = self._prices.price(model=model, usage=usage, at=self._batch.created_at)
            cost_usd, version, source = cost.cost_usd, cost.price_version, cost.price_source
        else:
            cost_usd, version, source = ZERO, self._prices.version_at(self._batch.created_at), "table"
        now = datetime.now(UTC)
        return UsageRecord(
            id=result_record_id(self._batch.id, custom_id),
            started_at=self._batch.created_at,
            finished_at=now,
            team=self._key.team,
            key_id=self._batch.key_id,
            feature=None,
            user=None,
            endpoint=BATCHES,
            model=model,
            response_model=model,
            upstream_request_id=None,
            status=200,
            outcome=outcome,
            error_type=error_type,
            streamed=False,
            cost_usd=cost_usd,
            price_version=version,
            price_source=source,
            batch_id=self._batch.id,
            custom_id=custom_id,
            latency_ms=round((now - self._batch.created_at).total_seconds() * 1000, 3),
            ttfb_ms=None,
            reservation=self._reservation,
            usage=usage or Usage(),
        )


def _error_type(result: dict[str, Any]) -> str | None:
    # Errored results nest the standard error shape: {"type": "error", "error": {"type": ..., "message": ...}}.
    outer = result.get("error")
    inner = outer.get("error") if isinstance(outer, dict) else None
    kind = inner.get("type") if isinstance(inner, dict) else None
    return kind if isinstance(kind, str) else None


def _owner(row: Any) -> BatchOwner:
    return BatchOwner(
        id=row.id,
        team_id=row.team_id,
        key_id=row.key_id,
        hold_call_id=row.hold_call_id,
        created_at=row.created_at,
        results_recorded=row.results_recorded_at is not None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultsFetcher:
    """Reads a batch's results from the upstream on spendgate's own key, and meters them."""

    engine: Engine
    upstream: Upstream
    upstream_url: str
    upstream_key: str | None
    prices: PriceTable
    submit: Callable[[UsageRecord], None]

    async def record(self, batch: BatchOwner, *, reader: KeyInfo | None = None) -> bool:
        """Meter the batch's results if it has ended; True when every result is recorded (or the batch is gone)."""
        status, body = await self._get(f"{BATCHES}/{batch.id}")
        if status == 404:
            # Deleted upstream before anyone read its results: nothing more can be metered; free its hold.
            await anyio.to_thread.run_sync(abandon, self.engine, batch)
            logger.warning("batch %s is gone upstream with its results unread; its hold is released", batch.id)
            return True
        if status != 200 or _json_object(body).get("processing_status") != "ended":
            return False
        meter = await anyio.to_thread.run_sync(
            partial(results_meter, self.engine, batch, reader=reader, prices=self.prices, submit=self.submit)
        )
        if meter is None:
            return False
        response = await self.upstream.send(
            "GET", f"{self.upstream_url}{BATCHES}/{batch.id}/results", self._headers(), b""
        )
        complete = False
        try:
            if response.status == 200:
                async for chunk in response.body:
                    meter.feed(chunk)
                complete = True
        finally:
            await response.close()
            meter.finish(complete=complete)
        if complete:
            logger.info("recorded %d results of batch %s", meter.results, batch.id)
        return complete

    async def reconcile(self, lease: timedelta) -> int:
        """Record ended batches nobody read through the proxy; each is leased to one replica at a time."""
        claimed = await anyio.to_thread.run_sync(
            partial(claim_unrecorded, self.engine, now=datetime.now(UTC), lease=lease)
        )
        recorded = 0
        for batch in claimed:
            done = False
            try:
                done = await self.record(batch)
            finally:
                if not done:
                    # Not ended yet (or the upstream failed): the next pass, here or on any replica, looks again
                    # rather than waiting out a lease that only guards reads in progress.
                    await anyio.to_thread.run_sync(release_lease, self.engine, batch.id)
            recorded += done
        return recorded

    async def _get(self, path: str) -> tuple[int, bytes]:
        response = await self.upstream.send("GET", f"{self.upstream_url}{path}", self._headers(), b"")
        try:
            return response.status, b"".join([chunk async for chunk in response.body])
        finally:
            await response.close()

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-api-key", (self.upstream_key or "").encode("latin-1")),
            (b"anthropic-version", ANTHROPIC_VERSION),
            (b"accept-encoding", b"identity"),
        ]


def abandon(engine: Engine, batch: BatchOwner) -> None:
    """Release a vanished batch's hold and stop looking for its results (blocking)."""
    with write_transaction(engine) as connection:
        settle(connection, [], soft_fraction=Decimal(1), release=[batch.hold_call_id])
        connection.execute(update(Batch).where(Batch.id == batch.id).values(results_recorded_at=datetime.now(UTC)))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}
