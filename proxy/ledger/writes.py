"""Where the ledger writer's transactions run: in a child process of their own, or in a thread.

A batch's transaction (`commit.insert_records`) is milliseconds of Python. In a thread it shares the serving
process's GIL, and so its core, with the calls. In a child process the serving process only pickles the batch
(about a tenth of the transaction's CPU) and awaits the outcome: with a core to spare, the transaction runs beside
the calls rather than between them; on the serving process's own core it only adds the cost of a second process.

The child is disposable. Every transaction is idempotent (ids already written are skipped), so a child that dies
mid-batch, killed or out of memory, only means the batch is tried again in a new one; a transaction it did not
commit was rolled back by the database. It ignores SIGINT and SIGTERM (the serving process decides when it stops,
after draining through it) and exits when the serving process is gone, whichever way it went.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from decimal import Decimal
from functools import partial
from multiprocessing.connection import wait
from pathlib import Path
from typing import Protocol, TypeVar

import anyio.to_thread
from sqlalchemy import Engine

from proxy.config import WriterMode
from proxy.ledger.commit import DEFAULT_SOFT_FRACTION, Inserted, insert_records, is_refused
from proxy.ledger.db import in_memory, make_engine
from proxy.ledger.reprice import correct_estimates
from proxy.types import UsageRecord

T = TypeVar("T")
logger = logging.getLogger("spendgate")


class WriteFailed(Exception):
    """A batch's transaction failed; `refused` when the database refused the data itself (retrying it can never
    succeed) rather than the connection failing. Carries text only, so it crosses from the child intact."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message, refused)
        self.message = message
        self.refused = refused

    def __str__(self) -> str:
        return self.message


class Writes(Protocol):
    """Runs the writer's transactions off the event loop."""

    async def write(self, records: list[UsageRecord], *, correct_as: str | None = None) -> Inserted:
        """Write a batch in one transaction; with `correct_as` (an audit actor), also correct the estimates another
        replica recorded for these calls. Raises `WriteFailed` when the transaction fails."""

    async def close(self) -> None:
        """Release what the writes hold (a child process), after the last write."""


def write_batch(
    engine: Engine, records: list[UsageRecord], *, soft_fraction: Decimal, correct_as: str | None
) -> Inserted:
    """Run one batch's transaction (blocking): insert, and correct estimates when asked."""
    try:
        inserted = insert_records(engine, records, soft_fraction=soft_fraction)
        if correct_as is not None:
            correct_estimates(engine, records, actor=correct_as)
    except Exception as exc:
        raise WriteFailed(f"{exc.__class__.__name__}: {str(exc)[:300]}", is_refused(exc)) from None
    return inserted


class InThread:
    """Transactions in a worker thread of the serving process, on its engine (when no core is spare for a child,
    and always for an in-memory SQLite ledger)."""

    def __init__(self, engine: Engine, *, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION) -> None:
        self._engine = engine
        self._soft_fraction = soft_fraction

    async def write(self, records: list[UsageRecord], *, correct_as: str | None = None) -> Inserted:
        """See `Writes.write`."""
        work = partial(write_batch, self._engine, records, soft_fraction=self._soft_fraction, correct_as=correct_as)
        return await anyio.to_thread.run_sync(work, abandon_on_cancel=False)

    async def close(self) -> None:
        """Nothing to release: the engine belongs to the app."""


class InProcess:
    """Transactions in one child process with its own engine on the same ledger; in `fallback` (a thread) when no
    child can be started here."""

    def __init__(self, url: str, *, fallback: Writes, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION) -> None:
        self._url = url
        self._fallback = fallback
        self._soft_fraction = soft_fraction
        self._pool: ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()
        # Why no child could be started, once that happened: every write then goes to the fallback.
        self.unavailable: str | None = None

    async def pid(self) -> int:
        """The child's process id (starting one if need be)."""
        pool = await self._ready()
        if pool is None:
            raise WriteFailed(f"the ledger writer process could not start: {self.unavailable}", refused=False)
        return await self._run(pool, os.getpid)

    async def write(self, records: list[UsageRecord], *, correct_as: str | None = None) -> Inserted:
        """See `Writes.write`; a child that died is replaced, and the batch fails to be tried again."""
        pool = await self._ready()
        if pool is None:
            return await self._fallback.write(records, correct_as=correct_as)
        work = partial(_write_in_child, self._url, records, soft_fraction=self._soft_fraction, correct_as=correct_as)
        return await self._run(pool, work)

    async def close(self) -> None:
        """Stop the child once it has finished what it was given."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.shutdown)
        await self._fallback.close()

    async def _run(self, pool: ProcessPoolExecutor, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, work)
        except BrokenProcessPool as exc:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False)
            raise WriteFailed(f"the ledger writer process died: {exc}", refused=False) from None

    async def _ready(self) -> ProcessPoolExecutor | None:
        async with self._starting:
            if self._pool is None and self.unavailable is None:
                # Never a fork of this process: it has threads (the SDK's, anyio's), and a forked copy of a lock
                # one of them held would never be released in the child. A fork server is a clean
                # single-threaded process with the writer's modules imported once: a new child starts in
                # milliseconds.
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
                pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_child_started)
                try:
                    # The first task starts the child, which waits for the fork server (and, the first time, for
                    # the server to start and import the writer): off the event loop.
                    await anyio.to_thread.run_sync(pool.submit, os.getpid)
                except Exception as exc:
                    # Nowhere to start one (no writable temporary folder for the fork server's socket, as under a
                    # read-only root file system; a process limit): the records are written all the same, from
                    # a thread, rather than queued until the calls are refused.
                    pool.shutdown(wait=False)
                    self.unavailable = f"{exc.__class__.__name__}: {exc}"
                    logger.error(
                        "the ledger writer process could not start (%s); writing from a thread", self.unavailable
                    )
                    return None
                self._pool = pool
            return self._pool


def writes_for(url: str, engine: Engine, mode: WriterMode, *, workers: int, soft_fraction: Decimal) -> Writes:
    """The writer's transactions for a ledger. `auto`: in a child process when the serving processes (`workers`)
    leave a core for it, else in a thread. On one core the child only competes with its serving process (measured:
    5-10% more CPU a call, no better tail); with a core to spare it takes its share of the work off the serving
    process (measured: 20-40% more calls a second at 32 connections). An in-memory SQLite ledger, which no other
    process can open, is always written from a thread."""
    in_thread = InThread(engine, soft_fraction=soft_fraction)
    if in_memory(engine.url) or mode == "thread" or (mode == "auto" and usable_cores() <= workers):
        return in_thread
    return InProcess(url, fallback=in_thread, soft_fraction=soft_fraction)


def usable_cores() -> int:
    """The cores this process may use: those it is pinned to, within its cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


# ------------------------------------------------------------------ in the child

_ENGINES: dict[str, Engine] = {}


def _child_started() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True).start()


def _exit_with(sentinel: int) -> None:
    # The sentinel becomes readable when the parent exits. A transaction in progress dies with the child and is
    # rolled back; the parent's crash journal holds its records for the next start.
    wait([sentinel])
    os._exit(0)


def _engine_for(url: str) -> Engine:
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = make_engine(url)
    return engine


def _write_in_child(
    url: str, records: list[UsageRecord], *, soft_fraction: Decimal, correct_as: str | None
) -> Inserted:
    return write_batch(_engine_for(url), records, soft_fraction=soft_fraction, correct_as=correct_as)
