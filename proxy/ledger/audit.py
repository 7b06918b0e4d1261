"""The tamper-evident audit trail: one hash chain over every usage record and every admin event.

Each entry stores the SHA-256 of its canonical content and `chain_hash = SHA-256(previous chain_hash +
content_hash)`. Positions come from one row, `audit_head`, locked by whoever appends (`SELECT … FOR UPDATE`
on PostgreSQL, `BEGIN IMMEDIATE` on SQLite) and released at commit: with any number of replicas writing, the
chain is the commit order and never forks. An edited entry no longer matches its content hash; a deleted,
inserted or reordered one breaks the chain or leaves a gap; a truncated tail no longer reaches the head.
Anyone able to rewrite the whole chain and the head could hide it, so keep the head hash that
`spendgate audit verify` prints somewhere else too. After `spendgate prune`, the walk starts from the cut's
checkpoint (`proxy/ledger/checkpoints.py`), vouched for by the prune's own event further down the chain.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, exists, insert, select, type_coerce, update

from proxy.ledger import checkpoints
from proxy.ledger.checkpoints import lock_head
from proxy.ledger.rollup_checks import disagreement
from proxy.ledger.schema import AdminEvent, AuditHead, RepriceEntry, UsageRow, UTCDateTime

GENESIS = "0" * 64
# What a usage record's content hash covers, in this order. Frozen, not derived from `UsageRecord` or the table:
# a column added later must not change the hash of entries already written, or no existing chain would verify.
# tests/test_record_fields.py fails until a new column is hashed (in `USAGE_HASHED_WHEN_SET`) or named there as
# left out on purpose.
USAGE_HASHED = (
    "id",
    "started_at",
    "finished_at",
    "team",
    "key_id",
    "feature",
    "user",
    "endpoint",
    "model",
    "response_model",
    "upstream_request_id",
    "status",
    "outcome",
    "error_type",
    "streamed",
    "batch_id",
    "custom_id",
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "web_fetch_requests",
    "service_tier",
    "speed",
    "inference_geo",
    "cost_usd",
    "price_version",
    "price_source",
    "is_retry",
    "retry_reason",
    "retry_of",
    "retry_count",
    "fingerprint",
    "attempt",
    "max_tokens_requested",
    "max_tokens_sent",
    "latency_ms",
    "ttfb_ms",
)
# Columns added since, hashed after the others only when set, so entries written before them keep their hash.
# `cost_source` as its bare value; those added after it as `[name, value]` pairs, so that a value cannot move from
# one of them to another unnoticed (bare, a session moved into `agent` would hash the same).
USAGE_HASHED_BARE = ("cost_source",)
# A call's session and agents are covered like its user and feature: they say whose spend it was (reports, the
# dashboard's top sessions), so an edit to them must fail `spendgate audit verify` as an edit to the user does.
USAGE_HASHED_NAMED = ("session", "agent", "parent_agent")
USAGE_HASHED_WHEN_SET = USAGE_HASHED_BARE + USAGE_HASHED_NAMED
USAGE_HASHED_ALL = USAGE_HASHED + USAGE_HASHED_WHEN_SET
_FIXED = len(USAGE_HASHED)
EVENT_HASHED = ("at", "actor", "action", "target", "details")
REPRICE_ACTION = "usage.reprice"
Change = tuple[str, Decimal, str]  # record id, corrected cost, price version
# One chain entry as the verifier reads it: position, kind, id, content hash, chain hash, hashed values.
Entry = tuple[int, str, Any, str, str, Sequence[Any]]
STREAM_BATCH = 5000
# One encoder for every hash: `default` is only called for the values JSON has no type for (times, money),
# so the C encoder does nearly all the work.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=lambda value: _canonical(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """What `verify` found: how many entries it checked, the head, and the first problem (None when intact)."""

    entries: int
    head_pos: int
    head_hash: str
    problem: str | None
    # Where the walk started: the latest prune's cut (the records up to it are exported and gone), else 0.
    checkpoint: int = 0


def usage_hashed_values(values: Sequence[Any]) -> Sequence[Any]:
    """A usage record's hashed values (in `USAGE_HASHED_ALL` order) with the later columns left out when unset."""
    named = _FIXED + len(USAGE_HASHED_BARE)
    return [
        *values[:_FIXED],
        *(value for value in values[_FIXED:named] if value is not None),
        *([name, value] for name, value in zip(USAGE_HASHED_NAMED, values[named:], strict=True) if value is not None),
    ]


def content_hash(values: Sequence[Any]) -> str:
    """SHA-256 of an entry's fields, as a JSON array in a fixed column order (money as exact text, times UTC)."""
    return hashlib.sha256(_ENCODER.encode(values).encode()).hexdigest()


def link(previous: str, content: str) -> str:
    """The chain hash of an entry whose content hash is `content`, after an entry whose chain hash is `previous`."""
    return hashlib.sha256((previous + content).encode()).hexdigest()


def extend(rows: list[dict[str, Any]], pos: int, head: str) -> tuple[int, str]:
    """Give usage rows, in order, their content hash and place after (`pos`, `head`); returns the new end."""
    for row in rows:
        row["content_hash"] = content_hash(usage_hashed_values([row[name] for name in USAGE_HASHED_ALL]))
        pos, head = pos + 1, link(head, row["content_hash"])
        row["chain_pos"], row["chain_hash"] = pos, head
    return pos, head


def write_head(connection: Connection, pos: int, head: str) -> None:
    """Move the end of the chain (in the transaction that holds its lock)."""
    connection.execute(update(AuditHead).where(AuditHead.id == 1).values(pos=pos, hash=head))


def record_event(
    connection: Connection, *, actor: str, action: str, target: str, before: Any = None, after: Any = None
) -> int:
    """Append an admin event in the caller's transaction, so the change and its record commit together.

    Returns the event's position in the chain.
    """
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
    return pos + 1


def verify(engine: Engine, *, progress: Callable[[int, int], None] | None = None) -> Verdict:
    """Walk the chain in order, streaming, from its start (or the latest prune's checkpoint), report the first entry
    that does not hold, then check the corrections and that the rollups agree with the records.

    `progress(done, total)` is called every few thousand entries."""
    with engine.connect() as connection:
        head_pos, head_hash = connection.execute(select(AuditHead.pos, AuditHead.hash).where(AuditHead.id == 1)).one()
        unchained = connection.execute(
            select(UsageRow.id).where(UsageRow.chain_pos.is_(None)).order_by(UsageRow.seq).limit(1)
        ).scalar()
        try:
            cut = checkpoints.latest(connection)
        except ValueError as forged:
            return Verdict(entries=0, head_pos=head_pos, head_hash=head_hash, problem=str(forged))
    start = (0, GENESIS) if cut is None else (cut.pos, cut.hash)
    verdict = functools.partial(Verdict, head_pos=head_pos, head_hash=head_hash, checkpoint=start[0])
    if unchained is not None:
        return verdict(
            entries=0, problem=f"usage record {unchained} is outside the chain (inserted behind spendgate's back)"
        )
    edited = _edited_before(engine, start[0])
    if edited is not None:
        return verdict(entries=0, problem=edited)
    # Only up to the head read above: records committed while we walk belong to the next verification.
    with contextlib.closing(_entries(engine, start[0], head_pos)) as entries:
        good, last, problem = _walk(entries, start, lambda done: progress(done, head_pos) if progress else None)
    if problem is None and (good != head_pos or last != head_hash):
        problem = f"the chain ends at entry {good} but the head says {head_pos}: entries were removed"
    if problem is None:
        with engine.connect() as connection:
            problem = check_repricing(connection, reprice_events(connection))
    if problem is None:
        problem = disagreement(engine)
    return verdict(entries=good - start[0], problem=problem)


def _edited_before(engine: Engine, cut: int) -> str | None:
    """The first entry left at or before a prune's cut (admin events are never pruned; records of a prune that
    died part way) whose content no longer matches its hash. (Its link to the entry before cannot be checked
    without the pruned records: their export keeps their chain hashes for that.)"""
    with contextlib.closing(_entries(engine, 0, cut)) as entries:
        for pos, kind, _ident, stored_content, _, values in entries:
            if content_hash(values) != stored_content:
                return f"{kind} at entry {pos}, before the prune checkpoint, was edited"
    return None


def _walk(
    entries: Iterator[Entry], start: tuple[int, str], progress: Callable[[int], None]
) -> tuple[int, str, str | None]:
    """Up to which position the entries hold from `start` (a position and its chain hash), the chain hash there,
    and the first problem."""
    good, previous = start
    for pos, kind, ident, stored_content, stored_chain, values in entries:
        if pos % STREAM_BATCH == 0:
            progress(pos)
        if pos != good + 1:
            return good, previous, f"entry {good + 1} is missing (next is {kind} {ident} at {pos})"
        if content_hash(values) != stored_content:
            return good, previous, f"entry {pos} ({kind} {ident}) was edited: its content hash differs"
        if link(previous, stored_content) != stored_chain:
            return good, previous, f"entry {pos} ({kind} {ident}) does not follow entry {pos - 1}"
        previous, good = stored_chain, pos
    return good, previous, None


def reprice_digest(changes: Iterable[Change]) -> str:
    """SHA-256 over a run's corrections in record-id order: what its audit event vouches for."""
    lines = "".join(f"{record_id}|{format(cost, 'f')}|{version}\n" for record_id, cost, version in sorted(changes))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_repricing(connection: Connection, digests: dict[int, str]) -> str | None:
    """The first problem with the corrections, given each reprice event's position and vouched digest."""
    for pos, digest in sorted(digests.items()):
        entries = connection.execute(
            select(RepriceEntry.record_id, RepriceEntry.cost_usd, RepriceEntry.price_version).where(
                RepriceEntry.event_pos == pos
            )
        ).all()
        if reprice_digest((entry[0], entry[1], entry[2]) for entry in entries) != digest:
            return f"the corrections of reprice event at entry {pos} were altered"
    vouched = exists().where(
        RepriceEntry.event_pos == UsageRow.repriced_by,
        RepriceEntry.record_id == UsageRow.id,
        RepriceEntry.cost_usd == UsageRow.repriced_cost_usd,
        RepriceEntry.price_version == UsageRow.repriced_price_version,
    )
    unvouched = connection.execute(
        select(UsageRow.id).where(UsageRow.repriced_cost_usd.is_not(None), ~vouched).limit(1)
    ).scalar()
    if unvouched is not None:
        return f"usage record {unvouched} carries a corrected cost no reprice event vouches for"
    return None


def reprice_events(connection: Connection) -> dict[int, str]:
    """Each reprice event's chain position and the digest it vouches for."""
    rows = connection.execute(
        select(AdminEvent.chain_pos, AdminEvent.details).where(AdminEvent.action == REPRICE_ACTION)
    )
    return {pos: json.loads(details)["after"]["digest"] for pos, details in rows}


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


def _entries(engine: Engine, first: int, last: int) -> Generator[Entry]:
    """Usage records and admin events after position `first` up to `last`, merged by chain position."""
    usage_columns = [_raw_time(UsageRow.__table__.c[name]) for name in USAGE_HASHED_ALL]
    event_columns = [_raw_time(AdminEvent.__table__.c[name]) for name in EVENT_HASHED]
    with engine.connect() as usage_connection, engine.connect() as event_connection:
        usage = usage_connection.execution_options(yield_per=STREAM_BATCH).execute(
            select(UsageRow.chain_pos, UsageRow.id, UsageRow.content_hash, UsageRow.chain_hash, *usage_columns)
            .where(UsageRow.chain_pos > first, UsageRow.chain_pos <= last)
            .order_by(UsageRow.chain_pos)
        )
        events = event_connection.execution_options(yield_per=STREAM_BATCH).execute(
            select(AdminEvent.chain_pos, AdminEvent.seq, AdminEvent.content_hash, AdminEvent.chain_hash, *event_columns)
            .where(AdminEvent.chain_pos > first, AdminEvent.chain_pos <= last)
            .order_by(AdminEvent.chain_pos)
        )
        streams = (
            ((row[0], "usage record", row[1], row[2], row[3], usage_hashed_values(row[4:])) for row in usage),
            ((row[0], "admin event", row[1], row[2], row[3], row[4:]) for row in events),
        )
        try:
            yield from heapq.merge(*streams, key=lambda entry: entry[0])
        finally:
            # A walk that stops at the first bad entry must not leave PostgreSQL's server-side cursors open.
            usage.close()
            events.close()


def _raw_time(column: Any) -> Any:
    # Times are stored in UTC without a zone; reading them naive skips a conversion per value on the verify path.
    return type_coerce(column, DateTime()).label(column.name) if isinstance(column.type, UTCDateTime) else column


def _canonical(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat() + "+00:00"
        return (value if value.tzinfo is UTC else value.astimezone(UTC)).isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"no canonical form for {type(value).__name__}")
