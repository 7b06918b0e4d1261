"""The off-path ledger writer: usage records are queued by the request handlers and written in batches.

Nothing is lost: a failed batch stays queued and is retried with backoff; shutdown drains the queue;
if the ledger is still unreachable after `drain_seconds`, the records are spilled to a JSONL file that
`spendgate serve` replays into the ledger on its next start. Inserts ignore ids already present, so a
batch whose commit succeeded but whose acknowledgement was lost is not written twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, StatementError

from proxy.audit import extend, lock_head, write_head
from proxy.budgets import SoftLimitCrossed, settle
from proxy.db import write_transaction
from proxy.gateway.routes import MESSAGES
from proxy.models import Batch, UsageRow
from proxy.retries import fingerprint, link_retries
from proxy.types import USAGE_COLUMNS, Counter, Reservation, Usage, UsageRecord

logger = logging.getLogger("spendgate")

MAX_BACKOFF_SECONDS = 5.0
DEFAULT_SOFT_FRACTION = Decimal("0.8")
_NOT_COLUMNS = ("usage", "reservation", "request_body", "retry_window_seconds")
_RECORD_COLUMNS = tuple(name for name in UsageRecord.__dataclass_fields__ if name not in _NOT_COLUMNS)
SoftLimitSink = Callable[[list[SoftLimitCrossed]], None]


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The ledger columns of a usage record (token counts flattened beside the call's fields)."""
    row = {name: getattr(record, name) for name in _RECORD_COLUMNS}
    row.update({name: getattr(record.usage, name) for name in USAGE_COLUMNS})
    if row["fingerprint"] is None and record.endpoint == MESSAGES:
        row["fingerprint"] = fingerprint(record.request_body)
    return row


def insert_records(
    engine: Engine, records: list[UsageRecord], *, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> list[SoftLimitCrossed]:
    """Insert usage records and settle their budget holds in one transaction (blocking).

    Ids already in the ledger are skipped and not settled again, so retrying a batch whose commit succeeded
    but whose acknowledgement was lost changes nothing. Retried calls are linked to their earlier attempts and
    every record is appended to the audit chain on the way in. Returns the soft limits the batch crossed.
    """
    rows = [record_to_row(record) for record in records]
    with write_transaction(engine) as connection:
        # The chain's lock serialises every writer, so the check for ids already written cannot race.
        pos, head = lock_head(connection)
        present = set(connection.execute(select(UsageRow.id).where(UsageRow.id.in_([r.id for r in records]))).scalars())
        fresh = [index for index, record in enumerate(records) if record.id not in present]
        rows = [rows[index] for index in fresh]
        link_retries(connection, rows, [records[index].retry_window_seconds for index in fresh])
        write_head(connection, *extend(rows, pos, head))
        if rows:
            connection.execute(insert(UsageRow), rows)
        # Holds are released even when their record was written before (a batch's last result read twice).
        held = [record for record in records if record.reservation is not None and record.reservation.held]
        finished = sorted({record.batch_id for record in held if record.batch_id is not None})
        if finished:
            connection.execute(
                update(Batch).where(Batch.id.in_(finished)).values(results_recorded_at=datetime.now(UTC))
            )
        return settle(
            connection,
            [records[index] for index in fresh],
            soft_fraction=soft_fraction,
            release=[record.reservation.call_id for record in held if record.reservation is not None],
        )


class Recorder:
    """Queues usage records from the hot path and writes them in batches from one background task."""

    def __init__(
        self,
        engine: Engine,
        *,
        flush_seconds: float,
        batch_size: int,
        drain_seconds: float,
        spill_dir: Path,
        soft_fraction: Decimal = DEFAULT_SOFT_FRACTION,
        on_soft_limit: SoftLimitSink | None = None,
    ) -> None:
        self._engine = engine
        self._soft_fraction = soft_fraction
        self._on_soft_limit = on_soft_limit
        self._flush_seconds = flush_seconds
        self._batch_size = batch_size
        self._drain_seconds = drain_seconds
        self._spill_dir = spill_dir
        self._pending: list[UsageRecord] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records accepted but not yet committed."""
        return len(self._pending)

    def submit(self, record: UsageRecord) -> None:
        """Queue a record; never blocks and never fails."""
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wakeup.set()

    def start(self) -> None:
        """Start the background writer (from the lifespan, inside the running loop)."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = self._flush_seconds
        while not self._closing:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=backoff)
            except TimeoutError:
                pass
            self._wakeup.clear()
            backoff = self._flush_seconds if await self._flush() else min(backoff * 2 or 0.1, MAX_BACKOFF_SECONDS)

    async def close(self) -> None:
        """Stop the loop and drain: retry until `drain_seconds` have passed, then spill what is left."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            # Let an in-flight batch finish first: two flushes at once would take the same records.
            await self._task
        deadline = time.monotonic() + self._drain_seconds
        backoff = 0.05
        while self._pending:
            if await self._flush():
                continue
            if time.monotonic() >= deadline:
                self._spill()
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _flush(self) -> bool:
        # Only what was queued when the flush began: under steady load, chasing records that arrive meanwhile
        # would turn batching into a stream of tiny transactions that starves the event loop of the GIL.
        queued = len(self._pending)
        while queued > 0:
            batch = self._pending[: min(self._batch_size, queued)]
            write = partial(insert_records, self._engine, batch, soft_fraction=self._soft_fraction)
            try:
                crossed = await anyio.to_thread.run_sync(write, abandon_on_cancel=False)
            except Exception as exc:
                if not _refused(exc):
                    logger.exception("could not write %d usage records; they stay queued and retried", len(batch))
                    return False
                # The database refused some record's data: write the others one by one, set the bad ones aside,
                # rather than retry a batch that can never succeed.
                crossed = await anyio.to_thread.run_sync(self._one_by_one, batch, abandon_on_cancel=False)
            del self._pending[: len(batch)]
            queued -= len(batch)
            if crossed and self._on_soft_limit is not None:
                self._on_soft_limit(crossed)
        return True

    def _one_by_one(self, batch: list[UsageRecord]) -> list[SoftLimitCrossed]:
        crossed: list[SoftLimitCrossed] = []
        for record in batch:
            try:
                crossed += insert_records(self._engine, [record], soft_fraction=self._soft_fraction)
            except Exception as exc:
                if not _refused(exc):
                    raise
                self._set_aside(record, exc)
        return crossed

    def _set_aside(self, record: UsageRecord, error: Exception) -> None:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"refused-{os.getpid()}.jsonl"
        with path.open("a") as refused:
            refused.write(json.dumps({**_to_spill(record), "error": str(error)[:500]}, default=str) + "\n")
        logger.error("the ledger refused usage record %s (%s); it was set aside in %s", record.id, error, path)

    def _spill(self) -> None:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"unwritten-{time.time_ns()}-{os.getpid()}.jsonl"
        with path.open("w") as spill:
            for record in self._pending:
                spill.write(json.dumps(_to_spill(record), default=str) + "\n")
        logger.error(
            "the ledger stayed unreachable: %d usage records spilled to %s; the next `spendgate serve` replays them",
            len(self._pending),
            path,
        )
        self._pending.clear()


def _refused(error: Exception) -> bool:
    """Whether the database refused the data itself (retrying it can never succeed), not the connection."""
    if isinstance(error, OperationalError):
        return False
    return isinstance(error, DataError | IntegrityError) or (
        isinstance(error, StatementError) and not isinstance(error, DBAPIError)
    )


def replay_spilled(engine: Engine, spill_dir: Path) -> int:
    """Write and settle records a previous process spilled, then delete their files; returns how many."""
    count = 0
    for path in sorted(spill_dir.glob("unwritten-*.jsonl")) if spill_dir.is_dir() else ():
        records = [_from_spill(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        if records:
            insert_records(engine, records)
        count += len(records)
        path.unlink()
        logger.warning("replayed %d spilled usage records from %s", len(records), path)
    return count


def _to_spill(record: UsageRecord) -> dict[str, Any]:
    data = record_to_row(record)
    data["reservation"] = None if record.reservation is None else asdict(record.reservation)
    return data


def _from_spill(data: dict[str, Any]) -> UsageRecord:
    fields = {name: data[name] for name in _RECORD_COLUMNS}
    for name in ("started_at", "finished_at"):
        fields[name] = datetime.fromisoformat(fields[name])
    if fields["cost_usd"] is not None:
        fields["cost_usd"] = Decimal(fields["cost_usd"])
    held = data["reservation"]
    reservation = None
    if held is not None:
        counters = tuple(
            Counter(
                scope=c["scope"],
                label=c["label"],
                period=c["period"],
                period_start=datetime.fromisoformat(c["period_start"]),
                budget_usd=None if c["budget_usd"] is None else Decimal(c["budget_usd"]),
            )
            for c in held["counters"]
        )
        reservation = Reservation(
            call_id=held["call_id"], counters=counters, amount=Decimal(held["amount"]), held=held["held"]
        )
    usage = Usage(**{name: data[name] for name in USAGE_COLUMNS})
    return UsageRecord(**fields, usage=usage, reservation=reservation)
