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
from dataclasses import asdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from proxy.models import UsageRow
from proxy.types import UsageRecord

logger = logging.getLogger("spendgate")

MAX_BACKOFF_SECONDS = 5.0
DATETIME_COLUMNS = ("started_at", "finished_at")


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The ledger columns of a usage record (token counts flattened beside the call's fields)."""
    row = {name: getattr(record, name) for name in record.__dataclass_fields__ if name != "usage"}
    usage = asdict(record.usage)
    usage.pop("iterations")
    row.update(usage)
    return row


def insert_records(engine: Engine, records: list[UsageRecord]) -> None:
    """Insert usage records in one transaction, skipping ids already in the ledger (blocking)."""
    insert_rows(engine, [record_to_row(record) for record in records])


def insert_rows(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Insert ledger rows in one transaction, skipping ids already in the ledger (blocking)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(UsageRow).on_conflict_do_nothing(index_elements=["id"])
    with engine.begin() as connection:
        connection.execute(statement, rows)


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
    ) -> None:
        self._engine = engine
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
        while self._pending:
            batch = self._pending[: self._batch_size]
            try:
                await anyio.to_thread.run_sync(insert_records, self._engine, batch, abandon_on_cancel=False)
            except Exception:
                logger.exception("could not write %d usage records; they stay queued and will be retried", len(batch))
                return False
            del self._pending[: len(batch)]
        return True

    def _spill(self) -> None:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"unwritten-{time.time_ns()}-{os.getpid()}.jsonl"
        with path.open("w") as spill:
            for record in self._pending:
                spill.write(json.dumps(record_to_row(record), default=str) + "\n")
        logger.error(
            "the ledger stayed unreachable: %d usage records spilled to %s; the next `spendgate serve` replays them",
            len(self._pending),
            path,
        )
        self._pending.clear()


def replay_spilled(engine: Engine, spill_dir: Path) -> int:
    """Write records a previous process spilled, then delete their files; returns how many were replayed."""
    count = 0
    for path in sorted(spill_dir.glob("unwritten-*.jsonl")) if spill_dir.is_dir() else ():
        rows = [_parse_spilled(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            insert_rows(engine, rows)
        count += len(rows)
        path.unlink()
        logger.warning("replayed %d spilled usage records from %s", len(rows), path)
    return count


def _parse_spilled(line: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(line)
    for name in DATETIME_COLUMNS:
        row[name] = datetime.fromisoformat(row[name])
    if row["cost_usd"] is not None:
        row["cost_usd"] = Decimal(row["cost_usd"])
    return row
