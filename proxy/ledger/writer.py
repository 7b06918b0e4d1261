"""The ledger writer: usage records queued by the request path, written in batches by one supervised task.

Nothing is lost and nothing stops it:
- a batch the ledger cannot take stays queued and is retried with backoff; a batch it refuses as data is
  written record by record, and the records it refuses are set aside on disk with their reason;
- a record that cannot even be set aside (disk full, folder not writable) stays in memory and is tried again,
  and `problem` says so, as it does when the ledger has not taken records for `stall_seconds`;
- if the loop itself fails, it is logged and restarted;
- the queue holds records only (never request bodies) and is bounded: when it is full the gate refuses new
  metered calls (`full`) rather than forwarding calls it could not record;
- shutdown drains the queue, then spills what the ledger would not take to a file the next start replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import anyio.to_thread

from proxy.errors import LedgerUnavailable
from proxy.instruments import Metrics
from proxy.ledger.budgets import SoftLimitCrossed
from proxy.ledger.commit import Retried
from proxy.ledger.disk import encode, record_to_json, set_aside, write_atomically
from proxy.ledger.journal import Journal, Start
from proxy.ledger.writes import WriteFailed, Writes
from proxy.logs import Trouble
from proxy.types import UsageRecord

logger = logging.getLogger("spendgate")

MAX_BACKOFF_SECONDS = 5.0
SoftLimitSink = Callable[[list[SoftLimitCrossed]], None]


class Writer:
    """Queues usage records from the request path and writes them in batches from one background task."""

    def __init__(
        self,
        writes: Writes,
        *,
        flush_seconds: float,
        batch_size: int,
        drain_seconds: float,
        spill_dir: Path,
        instance: str,
        max_pending: int = 100_000,
        stall_seconds: float = 30.0,
        on_soft_limit: SoftLimitSink | None = None,
        journal: Journal | None = None,
        on_committed: Callable[[Sequence[UsageRecord]], None] | None = None,
        metrics: Metrics,
    ) -> None:
        self._writes = writes
        self._flush_seconds = flush_seconds
        self._batch_size = batch_size
        self._drain_seconds = drain_seconds
        self._spill_dir = spill_dir
        self._instance = instance
        self._max_pending = max_pending
        self._stall_seconds = stall_seconds
        self._on_soft_limit = on_soft_limit
        self._journal = journal
        self._on_committed = on_committed
        self._metrics = metrics
        self._trouble = Trouble(logger, "writing usage records to the ledger")
        # Set when another replica took this process for dead and recorded its live calls at their estimate:
        # then each batch's real records correct those estimates.
        self.correct_estimates = False
        # (monotonic time queued, record), oldest first.
        self._pending: deque[tuple[float, UsageRecord]] = deque()
        # Refused records that could not be set aside on disk either: kept until they can.
        self._unplaced: list[tuple[UsageRecord, str]] = []
        self._last_error: str | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Records accepted but not yet committed (or set aside)."""
        return len(self._pending) + len(self._unplaced)

    @property
    def oldest_age(self) -> float:
        """Seconds the oldest pending record has waited (0 when none is pending)."""
        return time.monotonic() - self._pending[0][0] if self._pending else 0.0

    @property
    def full(self) -> bool:
        """Whether the queue is at its bound: new metered calls must be refused."""
        return len(self._pending) >= self._max_pending

    @property
    def problem(self) -> str | None:
        """Why records are not reaching the ledger, or None while they are."""
        if self._unplaced:
            return f"{len(self._unplaced)} refused records could not be set aside on disk: {self._last_error}"
        if self._journal is not None and self._journal.failing:
            return self._journal.failing
        age = self.oldest_age
        if age > self._stall_seconds:
            return f"records have waited {age:.0f} s for the ledger: {self._last_error or 'a write in progress'}"
        if self.full:
            return f"the write queue is full ({self._max_pending} records)"
        return None

    def began(self, start: Start) -> None:
        """Journal a call about to go upstream, so its record survives this process being killed; raises
        `LedgerUnavailable` when it cannot be journaled (the call must not go out: a crash before its record is
        written would lose it)."""
        if self._journal is None:
            return
        try:
            self._journal.started(start)
        except OSError:
            raise LedgerUnavailable(
                "spendgate cannot journal calls right now (its spill folder cannot be written), so it sends none."
            ) from None

    def submit(self, record: UsageRecord) -> None:
        """Journal and queue a record; never blocks on the ledger and never fails (past the bound too: the call
        already happened)."""
        if self._journal is not None:
            self._journal.ended(record)
        self._pending.append((time.monotonic(), record))
        if record.custom_id is None:
            # A batch result can come again (its results read twice, on any replica): it is counted once the
            # ledger has taken it as new, never here.
            self._metrics.recorded(record)
        if len(self._pending) >= self._batch_size:
            self._wakeup.set()

    def start(self) -> None:
        """Start the supervised writer loop (from the lifespan, inside the running loop)."""
        self._task = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        """Stop the loop and drain: retry until `drain_seconds` have passed, then spill what is left."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            # Let an in-flight batch finish first: two flushes at once would take the same records.
            await self._task
        deadline = time.monotonic() + self._drain_seconds
        backoff = 0.05
        while self.pending:
            if await self._flush_safely() and not self._unplaced:
                continue
            if time.monotonic() >= deadline and self._spill():
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        await self._writes.close()

    async def _supervise(self) -> None:
        backoff = self._flush_seconds
        while not self._closing:
            # Not `asyncio.wait_for`: on 3.11 it can swallow a cancellation that arrives as the wait ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wakeup.wait()
            self._wakeup.clear()
            ok = await self._flush_safely()
            backoff = self._flush_seconds if ok else min(backoff * 2 or 0.1, MAX_BACKOFF_SECONDS)

    async def _flush_safely(self) -> bool:
        try:
            return await self._flush()
        except Exception as exc:
            # A bug of ours or a failing collaborator: say so and go on; the records are still queued.
            self._last_error = f"{exc.__class__.__name__}: {exc}"
            self._trouble.failed(exc, detail=f" ({self.pending} records queued)", traceback=True)
            return False

    async def _flush(self) -> bool:
        if self._unplaced:
            await anyio.to_thread.run_sync(self._place_unplaced, abandon_on_cancel=False)
        # Only what was queued when the flush began: under steady load, chasing records that arrive meanwhile
        # would turn batching into a stream of tiny transactions that starves the event loop of the GIL.
        queued = len(self._pending)
        while queued > 0:
            batch = [record for _, record in islice(self._pending, min(self._batch_size, queued))]
            correct_as = f"instance:{self._instance}" if self.correct_estimates else None
            try:
                crossed, retries, results = await self._writes.write(batch, correct_as=correct_as)
                done = len(batch)
            except WriteFailed as failed:
                self._last_error = str(failed)
                self._metrics.write_errors.inc()
                if not failed.refused:
                    self._trouble.failed(failed, detail=f" ({self.pending} records queued, kept until it works)")
                    return False
                # The database refused some record's data: write the others one by one and set the bad ones
                # aside, rather than retry a batch that can never succeed.
                done, crossed, retries, results = await self._one_by_one(batch)
            self._trouble.succeeded()
            self._metrics.written(retries)
            written = set(results)
            for record in batch[:done]:
                if record.id in written:
                    written.discard(record.id)
                    self._metrics.recorded(record)
            for _ in range(done):
                self._pending.popleft()
            queued -= done
            if self._journal is not None:
                self._journal.committed(batch[:done])
            if self._on_committed is not None:
                self._on_committed(batch[:done])
            if crossed and self._on_soft_limit is not None:
                self._on_soft_limit(crossed)
            if done < len(batch):
                return False
        self._last_error = None
        return True

    async def _one_by_one(
        self, batch: list[UsageRecord]
    ) -> tuple[int, list[SoftLimitCrossed], list[Retried], list[str]]:
        """Write records singly; returns how many were dealt with (written, skipped as written before, or set aside)
        before a failure, and what the writes reported."""
        crossed: list[SoftLimitCrossed] = []
        retries: list[Retried] = []
        results: list[str] = []
        for index, record in enumerate(batch):
            try:
                inserted = await self._writes.write([record])
            except WriteFailed as failed:
                if not failed.refused:
                    logger.error("could not write usage record %s (%s); it stays queued", record.id, failed)
                    return index, crossed, retries, results
                await anyio.to_thread.run_sync(self._place, record, str(failed))
                continue
            crossed += inserted.crossed
            retries += inserted.retries
            results += inserted.results
        return len(batch), crossed, retries, results

    def _place(self, record: UsageRecord, reason: str) -> None:
        try:
            set_aside(self._spill_dir, self._instance, record_to_json(record), reason)
            self._metrics.set_aside.inc()
            logger.error(
                "the ledger refused usage record %s (%s); it was set aside in %s", record.id, reason, self._spill_dir
            )
        except OSError as exc:
            self._last_error = f"cannot set aside in {self._spill_dir}: {exc}"
            logger.critical(
                "usage record %s was refused by the ledger AND cannot be set aside (%s); it is kept "
                "in memory until it can",
                record.id,
                exc,
            )
            self._unplaced.append((record, reason))

    def _place_unplaced(self) -> None:
        unplaced, self._unplaced = self._unplaced, []
        for record, reason in unplaced:
            self._place(record, reason)

    def _spill(self) -> bool:
        """Write what is left to a spill file for the next start; False (and everything kept) if the disk says no."""
        records = [record for _, record in self._pending] + [record for record, _ in self._unplaced]
        path = self._spill_dir / f"unwritten-{time.time_ns()}-{self._instance}.jsonl"
        try:
            write_atomically(path, (encode(record_to_json(record)) for record in records))
        except OSError as exc:
            logger.critical("could not spill %d usage records to %s (%s); still trying", len(records), path, exc)
            return False
        logger.error(
            "the ledger stayed unreachable: %d usage records spilled to %s; the next `spendgate serve` replays them",
            len(records),
            path,
        )
        self._pending.clear()
        self._unplaced.clear()
        if self._journal is not None:
            # On disk in a file the next start replays: the journal may let them go.
            self._journal.committed(records)
        return True
