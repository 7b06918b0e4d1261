"""This process's leases of both kinds, kept by one upkeep, ended by one close, forgotten together."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from proxy.gateway.leases.budget import BudgetLeases, LeaseNote
from proxy.gateway.leases.rate import RateLeases
from proxy.instruments import Metrics


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
        self._books: tuple[LeaseBook, ...] = (self.budgets, self.rates)

    async def upkeep(self) -> None:
        """One upkeep of every lease; a kind whose ledger work fails does not hold up the other."""
        failed: BaseException | None = None
        for book in self._books:
            try:
                await book.upkeep()
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    async def close(self) -> None:
        """Give back every lease at a clean exit; with the ledger unreachable, they are left to the reaper, as a dead
        process's would be."""
        for book in self._books:
            try:
                await book.close()
            except SQLAlchemyError:
                pass

    def forget(self) -> None:
        """Admit nothing more against leases another replica counted as used (this process was taken for dead)."""
        for book in self._books:
            book.forget()
