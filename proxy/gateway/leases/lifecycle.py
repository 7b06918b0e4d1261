"""This process's leases of both kinds, kept by one upkeep, ended by one close, forgotten together."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from proxy.gateway.leases.budget import BudgetLeases, LeaseNote
from proxy.gateway.leases.policy import UPKEEP_SECONDS
from proxy.gateway.leases.rate import RateLeases
from proxy.gateway.waits import shielded
from proxy.instruments import Metrics
from proxy.logs import Trouble

logger = logging.getLogger("spendgate")


class LeaseBook(Protocol):
    """What every kind of lease does besides admitting calls (which differs: dollars of budgets, tokens of buckets)."""

    async def upkeep(self) -> None:
        """Bring each lease in line with its demand, and end those nobody uses (once a second)."""

    async def close(self) -> None:
        """At a clean exit, once every call is recorded: give every lease back."""

    def forget(self) -> None:
        """Taken for dead by another replica, which counted every lease as used: admit nothing more against them."""


class Leases:
    """Both kinds of lease of one serving process: `budgets` and `rates` admit calls; the rest is done for both."""

    def __init__(
        self,
        engine: Engine,
        *,
        instance: str,
        ttl: timedelta,
        note: LeaseNote,
        metrics: Metrics,
        wait_seconds: float | None = None,
    ) -> None:
        self.budgets = BudgetLeases(
            engine, instance=instance, ttl=ttl, note=note, metrics=metrics, wait_seconds=wait_seconds
        )
        self.rates = RateLeases(engine, instance=instance, metrics=metrics, wait_seconds=wait_seconds)
        books: tuple[tuple[LeaseBook, str], ...] = ((self.budgets, "budget"), (self.rates, "rate limit"))
        self._books = tuple((book, Trouble(logger, f"the upkeep of {name} leases")) for book, name in books)

    async def keep(self) -> None:
        """The upkeep of every lease, once a second until cancelled (a round under way still ends, and the stop
        waits for it): each kind in a lane of its own, so one kind's ledger work, failing or waiting on a lock,
        never holds up the other's. Failures are logged as they start and end."""
        async with asyncio.TaskGroup() as lanes:
            for book, trouble in self._books:
                lanes.create_task(_upkeep_every_second(book, trouble))

    async def close(self) -> bool:
        """Give back every lease at a clean exit; whether all went back. With the ledger unreachable they stay in
        it, and this process's journal must stay too: the replica that reaps this process records them as used,
        and only a replay of the journal corrects those records to what the calls cost."""
        ended = True
        for book, _ in self._books:
            try:
                await book.close()
            except SQLAlchemyError:
                ended = False
        return ended

    def forget(self) -> None:
        """Admit nothing more against leases another replica counted as used (this process was taken for dead)."""
        for book, _ in self._books:
            book.forget()


async def _upkeep_every_second(book: LeaseBook, trouble: Trouble) -> None:
    while True:
        await asyncio.sleep(UPKEEP_SECONDS)
        try:
            await shielded(book.upkeep())
        except Exception as exc:
            trouble.failed(exc, traceback=not isinstance(exc, SQLAlchemyError))
        else:
            trouble.succeeded()
