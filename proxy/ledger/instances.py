"""Serving processes and their heartbeats: holds are tied to live processes, never to a clock alone.

Each `spendgate serve` process registers under its instance id and beats every few seconds. A hold belongs to
the process whose call took it and never expires while that process beats. When a process's heartbeat is older
than the limit, any live replica turns its holds into `interrupted` records at the amount held (cost flagged
`cost_source: estimate`) and settles them: Anthropic may have billed those calls, so their budget is spent, not
freed. The record ids are the calls' ids, so the dead process's journal, replayed later, cannot count them twice.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from proxy.db import write_transaction
from proxy.ledger.commit import insert_records
from proxy.ledger.journal import Start, interrupted
from proxy.models import BudgetReservation, Instance
from proxy.pricing import PriceTable
from proxy.rates import drop_holdings
from proxy.types import PERIODS, Counter, Period, Reservation, UsageRecord

logger = logging.getLogger("spendgate")


class Heartbeat:
    """This process's heartbeat, and the reaper that runs with it."""

    def __init__(self, engine: Engine, prices: PriceTable, instance: str, *, limit: timedelta) -> None:
        self._engine = engine
        self._prices = prices
        self._instance = instance
        self._limit = limit
        self._beating_since: datetime | None = None
        # Set once another replica took this process for dead and recorded its calls at their estimate.
        self.taken_for_dead = False

    def start(self, now: datetime) -> None:
        """Register this process (blocking)."""
        register(self._engine, self._instance, now)
        self._beating_since = now

    def tick(self, now: datetime) -> None:
        """Beat, then record the calls of processes that stopped beating (blocking)."""
        try:
            if not beat(self._engine, self._instance, now):
                self.taken_for_dead = True
        except Exception:
            self._beating_since = None
            raise
        if self._beating_since is None:
            self._beating_since = now
        # Only a process that has itself beaten for a whole limit may call another dead: after a ledger outage
        # every heartbeat is stale, and the other replicas must get their chance to beat first.
        if now - self._beating_since >= self._limit:
            reap(self._engine, self._prices, now, limit=self._limit)

    def stop(self) -> None:
        """A clean exit, once every call of this process is recorded (blocking)."""
        retire(self._engine, self._instance)


def register(engine: Engine, instance: str, now: datetime) -> None:
    """Announce a serving process (blocking)."""
    with engine.begin() as connection:
        connection.execute(delete(Instance).where(Instance.id == instance))
        connection.execute(insert(Instance).values(id=instance, started_at=now, heartbeat_at=now))


def beat(engine: Engine, instance: str, now: datetime) -> bool:
    """Say this process is alive (blocking). False when a reaper had taken it for dead (it registers again)."""
    with engine.begin() as connection:
        found = connection.execute(update(Instance).where(Instance.id == instance).values(heartbeat_at=now))
        if found.rowcount == 0:
            logger.error("this process (%s) was taken for dead by another replica; registering again", instance)
            connection.execute(insert(Instance).values(id=instance, started_at=now, heartbeat_at=now))
            return False
    return True


def retire(engine: Engine, instance: str) -> None:
    """A clean exit, after every call of the process has been recorded (blocking)."""
    with engine.begin() as connection:
        connection.execute(delete(Instance).where(Instance.id == instance))


def reap(engine: Engine, prices: PriceTable, now: datetime, *, limit: timedelta) -> int:
    """Turn the holds of processes whose heartbeat is older than `limit` into `interrupted` records (blocking).

    Returns how many calls were recorded. Safe on any number of replicas at once: record ids are call ids.
    """
    with Session(engine) as session:
        dead = list(session.execute(select(Instance.id).where(Instance.heartbeat_at < now - limit)).scalars())
        holds = select(BudgetReservation).where(BudgetReservation.instance_id.in_(dead))
        rows = list(session.execute(holds).scalars()) if dead else []
    calls: dict[str, list[BudgetReservation]] = {}
    for row in rows:
        calls.setdefault(row.call_id, []).append(row)
    records = [_interrupted(holds, prices, now) for holds in calls.values()]
    if records:
        insert_records(engine, records)
        logger.warning(
            "recorded %d calls of dead processes %s as interrupted at their held amount", len(records), ", ".join(dead)
        )
    with write_transaction(engine) as connection:
        # Only the processes still stale now: one that beat meanwhile keeps its rate-limit holdings.
        gone = connection.execute(
            delete(Instance).where(Instance.id.in_(dead), Instance.heartbeat_at < now - limit).returning(Instance.id)
        ).scalars()
        drop_holdings(connection, list(gone), now)
    return len(records)


def _interrupted(holds: list[BudgetReservation], prices: PriceTable, now: datetime) -> UsageRecord:
    first = holds[0]
    amount: Decimal = first.amount_usd
    counters = tuple(
        Counter(
            scope=hold.scope,
            label=hold.scope,
            period=_period(hold.scope),
            period_start=hold.period_start,
            budget_usd=None,
        )
        for hold in holds
    )
    # Only a metered call takes a hold; what else it was is not in the ledger.
    start = Start(
        id=first.call_id,
        started_at=first.started_at or now,
        team=first.team,
        key_id=first.key_id,
        feature=None,
        user=first.user,
        endpoint=first.endpoint or "",
        model=first.model,
        streamed=False,
        max_tokens=None,
        input_bound=0,
        held=amount,
        metered=True,
    )
    reservation = Reservation(call_id=first.call_id, counters=counters, amount=amount, held=True)
    return interrupted(start, cost=amount, reservation=reservation, prices=prices)


def _period(scope: str) -> Period:
    period = scope.rsplit(":", 1)[-1]
    return next((known for known in PERIODS if known == period), "month")
