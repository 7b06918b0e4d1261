"""Bounded waits for the ledger on the request path: a call waits at most `SPENDGATE_LEDGER_WAIT_SECONDS` for an
answer the ledger owes it (a lock someone else holds, a database that stopped answering), then gets the documented
503 `ledger_unavailable`.

A transaction cannot be abandoned halfway: its thread runs to the end, and what it did must be kept or undone (a
lease granted belongs to this process, a hold taken is in the ledger). So the wait is bounded, not the work: the
work finishes in the background and applies its result there, or `late` undoes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.errors import LedgerUnavailable

T = TypeVar("T")
logger = logging.getLogger("spendgate")
# Ledger work nobody waits for any more (every event loop's: each app in a process has its own). At shutdown the
# app waits for its own (`outliving`) before it ends its leases: a grant or hold landing after them would stay in
# the ledger, owned by a process that is gone, until its expiry.
_OUTLIVING: set[asyncio.Future[Any]] = set()


def too_slow(seconds: float) -> LedgerUnavailable:
    """The refusal of a call whose wait for the ledger ran out."""
    return LedgerUnavailable(
        f"The spend ledger did not answer within {seconds:g} s (it is locked or unreachable), so the call was not "
        "sent. Try again later."
    )


async def bounded(work: Awaitable[T], seconds: float, *, late: Callable[[T], object] | None = None) -> T:
    """The result of `work`, waited for at most `seconds` (`LedgerUnavailable` past that); `work` goes on, and
    `late` gets its result if it succeeds after nobody waits for it any more."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except BaseException:
        _when_done(task, late)
        raise
    if not done:
        _when_done(task, late)
        raise too_slow(seconds)
    return task.result()


class Turns:
    """One exchange with the ledger at a time, like a lock, except that a caller whose wait runs out leaves its
    exchange to finish in the background still holding the turn: the next exchange never overlaps it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """Whether an exchange is running or waited for."""
        return self._lock.locked()

    async def run(self, exchange: Callable[[], Awaitable[T]], seconds: float | None) -> T:
        """Run `exchange` in turn; with `seconds`, wait for the turn and for the exchange at most that long."""
        if seconds is None:
            async with self._lock:
                return await exchange()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            async with asyncio.timeout(seconds):
                await self._lock.acquire()
        except TimeoutError:
            raise too_slow(seconds) from None

        async def in_turn() -> T:
            try:
                return await exchange()
            finally:
                self._lock.release()

        return await bounded(in_turn(), max(deadline - loop.time(), 0.0))


def outlive(task: asyncio.Future[Any]) -> None:
    """Keep `task`, ledger work nobody waits for, until it ends; the app's shutdown waits for it."""
    _OUTLIVING.add(task)
    task.add_done_callback(_OUTLIVING.discard)


async def outliving(seconds: float) -> int:
    """Wait at most `seconds` for this event loop's ledger work that nobody waits for (including what such work
    starts as it ends: a late hold's release); how much of it is still running then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    if running := sum(task.get_loop() is loop for task in _OUTLIVING):
        logger.info("waiting up to %g s for %d ledger exchanges that calls stopped waiting for", seconds, running)
    while pending := {task for task in _OUTLIVING if task.get_loop() is loop}:
        if loop.time() >= deadline:
            return len(pending)
        await asyncio.wait(pending, timeout=deadline - loop.time())
    return 0


def _when_done(task: asyncio.Future[T], late: Callable[[T], object] | None) -> None:
    outlive(task)

    def done(task: asyncio.Future[T]) -> None:
        # Retrieved either way, so a failure nobody waits for is not reported as never retrieved.
        if task.cancelled() or task.exception() is not None:
            return
        if late is not None:
            late(task.result())

    task.add_done_callback(done)
