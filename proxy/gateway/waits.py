"""Bounded waits for the ledger on the request path: a call waits at most `SPENDGATE_LEDGER_WAIT_SECONDS` for an
answer the ledger owes it (a lock someone else holds, a database that stopped answering), then gets the documented
503 `ledger_unavailable`.

A transaction cannot be abandoned halfway: its thread runs to the end, and what it did must be kept or undone (a
lease granted belongs to this process, a hold taken is in the ledger). So the wait is bounded, not the work: the
work finishes in the background and applies its result there, or is given back (`bounded_take`). A stop waits
for all of it (`outliving`) before it ends the process's leases.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread

from proxy.errors import LedgerUnavailable

T = TypeVar("T")
logger = logging.getLogger("spendgate")
# Ledger work nobody waits for any more (every event loop's: each app in a process has its own). At shutdown the
# app waits for its own (`outliving`) before it ends its leases: a grant landing after them would stay in the
# ledger, owned by a process that is gone, until its expiry.
_OUTLIVING: set[asyncio.Future[Any]] = set()


def too_slow(seconds: float) -> LedgerUnavailable:
    """The refusal of a call whose wait for the ledger ran out."""
    return LedgerUnavailable(
        f"The spend ledger did not answer within {seconds:g} s (it is locked or unreachable), so the call was not "
        "sent. Try again later."
    )


async def bounded(work: Awaitable[T], seconds: float) -> T:
    """The result of `work`, waited for at most `seconds` (`LedgerUnavailable` past that); `work` goes on (and the
    app's shutdown waits for it)."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except BaseException:
        outlive(task)
        raise
    if not done:
        outlive(task)
        raise too_slow(seconds)
    return task.result()


@dataclass(slots=True)
class _Taking:
    """Whether a take in a thread has happened, and whether its caller stopped waiting for it: whichever comes
    second gives it back, under the lock, so exactly one does."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: bool = False
    abandoned: bool = False


async def bounded_take(take: Callable[[], object], give_back: Callable[[], object], seconds: float) -> None:
    """Run `take` (it takes something in the ledger: a budget hold) in a thread, waited for at most `seconds` like
    `bounded`. If the caller stops waiting (the wait ran out, or it was cancelled), `give_back` undoes the take
    once it has happened: in the take's own thread when it happens later, so it is undone even if this event
    loop has stopped by then."""
    taking = _Taking()

    def in_thread() -> None:
        take()
        with taking.lock:
            taking.taken = True
            undo = taking.abandoned
        if undo:
            _undo(give_back)

    try:
        await bounded(anyio.to_thread.run_sync(in_thread), seconds)
    except BaseException:
        with taking.lock:
            taking.abandoned = True
            undo = taking.taken
        if undo:
            # Taken as the wait ran out, in a thread that has gone on.
            outlive(asyncio.ensure_future(anyio.to_thread.run_sync(_undo, give_back)))
        raise


def _undo(give_back: Callable[[], object]) -> None:
    try:
        give_back()
    except Exception as exc:
        logger.error("a hold of a refused call could not be given back (it is released at its expiry): %s", exc)


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
    task.add_done_callback(_ended)


def _ended(task: asyncio.Future[Any]) -> None:
    _OUTLIVING.discard(task)
    # Retrieved, so that a failure is not reported as never retrieved: whoever cares has seen it already.
    if not task.cancelled():
        task.exception()


async def shielded(work: Awaitable[T]) -> T:
    """`work`'s result, with `work` run to its end even if the caller is cancelled (the upkeep, at a stop): ledger
    work cut off while its thread goes on would commit with nobody left to apply it in memory. The app's
    shutdown waits for it."""
    task = asyncio.ensure_future(work)
    outlive(task)
    return await asyncio.shield(task)


async def outliving(seconds: float) -> int:
    """Wait at most `seconds` for this event loop's ledger work that nobody waits for (and any that joins it
    meanwhile); how much of it is still running then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    def pending() -> set[asyncio.Future[Any]]:
        # A copy first (one step under the GIL): other apps' loops, in other threads, change the set meanwhile.
        return {task for task in tuple(_OUTLIVING) if task.get_loop() is loop}

    if running := len(pending()):
        logger.info("waiting up to %g s for %d ledger exchanges still running", seconds, running)
    while left := pending():
        if loop.time() >= deadline:
            return len(left)
        await asyncio.wait(left, timeout=deadline - loop.time())
    return 0
