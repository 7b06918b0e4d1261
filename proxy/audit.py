"""The tamper-evident audit trail: one hash chain over every usage record and every admin event.

Each entry stores the SHA-256 of its canonical content and `chain_hash = SHA-256(previous chain_hash +
content_hash)`. Positions come from one row, `audit_head`, locked by whoever appends (`SELECT … FOR UPDATE`
on PostgreSQL, `BEGIN IMMEDIATE` on SQLite) and released at commit: with any number of replicas writing, the
chain is the commit order and never forks. An edited entry no longer matches its content hash; a deleted,
inserted or reordered one breaks the chain or leaves a gap; a truncated tail no longer reaches the head.
Anyone able to rewrite the whole chain and the head could hide it, so keep the head hash that
`spendgate audit verify` prints somewhere else too.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from proxy.models import AdminEvent, AuditHead, UsageRow

GENESIS = "0" * 64
CHAIN_COLUMNS = ("seq", "content_hash", "chain_pos", "chain_hash")
USAGE_HASHED = tuple(column.name for column in UsageRow.__table__.columns if column.name not in CHAIN_COLUMNS)
EVENT_HASHED = ("at", "actor", "action", "target", "details")
STREAM_BATCH = 5000


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What `verify` found: how many entries it checked, the head, and the first problem (None when intact)."""

    entries: int
    head_pos: int
    head_hash: str
    problem: str | None


def content_hash(values: Sequence[Any]) -> str:
    """SHA-256 of an entry's fields, as a JSON array in a fixed column order (money as exact text, times UTC)."""
    return hashlib.sha256(json.dumps([_canonical(v) for v in values], separators=(",", ":")).encode()).hexdigest()


def link(previous: str, content: str) -> str:
    """The chain hash of an entry whose content hash is `content`, after an entry whose chain hash is `previous`."""
    return hashlib.sha256((previous + content).encode()).hexdigest()


def lock_head(connection: Connection) -> tuple[int, str]:
    """Lock the end of the chain for this transaction; returns its position and hash."""
    pos, head = connection.execute(
        select(AuditHead.pos, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
    ).one()
    return pos, head


def extend(rows: list[dict[str, Any]], pos: int, head: str) -> tuple[int, str]:
    """Give usage rows, in order, their content hash and place after (`pos`, `head`); returns the new end."""
    for row in rows:
        row["content_hash"] = content_hash([row[name] for name in USAGE_HASHED])
        pos, head = pos + 1, link(head, row["content_hash"])
        row["chain_pos"], row["chain_hash"] = pos, head
    return pos, head


def write_head(connection: Connection, pos: int, head: str) -> None:
    """Move the end of the chain (in the transaction that holds its lock)."""
    connection.execute(update(AuditHead).where(AuditHead.id == 1).values(pos=pos, hash=head))


def record_event(
    connection: Connection, *, actor: str, action: str, target: str, before: Any = None, after: Any = None
) -> None:
    """Append an admin event in the caller's transaction, so the change and its record commit together."""
    event: dict[str, Any] = {
        "at": datetime.now(UTC),
        "actor": actor,
        "action": action,
        "target": target,
        "details": json.dumps({"before": before, "after": after}, sort_keys=True, default=str),
    }
    pos, head = lock_head(connection)
    hashed = content_hash([event[name] for name in EVENT_HASHED])
    chained = link(head, hashed)
    connection.execute(insert(AdminEvent).values(**event, content_hash=hashed, chain_pos=pos + 1, chain_hash=chained))
    write_head(connection, pos + 1, chained)


def verify(engine: Engine) -> Verdict:
    """Walk the whole chain in order, streaming, and report the first entry that does not hold."""
    with engine.connect() as connection:
        head_pos, head_hash = connection.execute(select(AuditHead.pos, AuditHead.hash).where(AuditHead.id == 1)).one()
        unchained = connection.execute(
            select(UsageRow.id).where(UsageRow.chain_pos.is_(None)).order_by(UsageRow.seq).limit(1)
        ).scalar()
    if unchained is not None:
        outside = f"usage record {unchained} is outside the chain (inserted behind spendgate's back)"
        return Verdict(entries=0, head_pos=head_pos, head_hash=head_hash, problem=outside)
    with contextlib.closing(_entries(engine)) as entries:
        good, last, problem = _walk(entries)
    if problem is None and (good != head_pos or last != head_hash):
        problem = f"the chain ends at entry {good} but the head says {head_pos}: entries were removed"
    return Verdict(entries=good, head_pos=head_pos, head_hash=head_hash, problem=problem)


def _walk(entries: Iterator[tuple[int, str, str, str, list[Any]]]) -> tuple[int, str, str | None]:
    """How many entries hold from the start, the chain hash of the last one, and the first problem."""
    previous, good = GENESIS, 0
    for pos, name, stored_content, stored_chain, values in entries:
        if pos != good + 1:
            return good, previous, f"entry {good + 1} is missing (next is {name} at {pos})"
        if content_hash(values) != stored_content:
            return good, previous, f"entry {pos} ({name}) was edited: its content hash differs"
        if link(previous, stored_content) != stored_chain:
            return good, previous, f"entry {pos} ({name}) does not follow entry {pos - 1}"
        previous, good = stored_chain, pos
    return good, previous, None


def iter_events(engine: Engine, *, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Admin events oldest first, as JSON-ready dicts (`audit export`)."""
    query = select(*AdminEvent.__table__.columns).order_by(AdminEvent.chain_pos)
    if since is not None:
        query = query.where(AdminEvent.at >= since)
    with engine.connect() as connection:
        for row in connection.execution_options(yield_per=STREAM_BATCH).execute(query):
            details = json.loads(row.details)
            yield {
                "at": row.at.isoformat(),
                "actor": row.actor,
                "action": row.action,
                "target": row.target,
                "before": details["before"],
                "after": details["after"],
                "chain_pos": row.chain_pos,
                "chain_hash": row.chain_hash,
            }


def _entries(engine: Engine) -> Generator[tuple[int, str, str, str, list[Any]]]:
    """Usage records and admin events merged by chain position: (pos, name, content hash, chain hash, values)."""
    usage_columns = [UsageRow.__table__.c[name] for name in USAGE_HASHED]
    event_columns = [AdminEvent.__table__.c[name] for name in EVENT_HASHED]
    with engine.connect() as usage_connection, engine.connect() as event_connection:
        usage = usage_connection.execution_options(yield_per=STREAM_BATCH).execute(
            select(UsageRow.chain_pos, UsageRow.id, UsageRow.content_hash, UsageRow.chain_hash, *usage_columns)
            .where(UsageRow.chain_pos.is_not(None))
            .order_by(UsageRow.chain_pos)
        )
        events = event_connection.execution_options(yield_per=STREAM_BATCH).execute(
            select(
                AdminEvent.chain_pos, AdminEvent.seq, AdminEvent.content_hash, AdminEvent.chain_hash, *event_columns
            ).order_by(AdminEvent.chain_pos)
        )
        streams = (
            ((row[0], f"usage record {row[1]}", row[2], row[3], list(row[4:])) for row in usage),
            ((row[0], f"admin event {row[1]}", row[2], row[3], list(row[4:])) for row in events),
        )
        try:
            yield from heapq.merge(*streams, key=lambda entry: entry[0])
        finally:
            # A walk that stops at the first bad entry must not leave PostgreSQL's server-side cursors open.
            usage.close()
            events.close()


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return value
