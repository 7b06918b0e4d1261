"""Serving processes and their heartbeats: holds are tied to live processes, never to a clock alone.

Each `spendgate serve` process registers under its instance id and beats every few seconds. A hold belongs to
the process whose call took it and never expires while that process beats. When a process's heartbeat is older
than the limit, any live replica turns its holds into `interrupted` records at the amount held (cost flagged
`cost_source: estimate`) and settles them: Anthropic may have billed those calls, so their budget is spent, not
freed. The record ids are the calls' ids, so the dead process's journal, replayed later, cannot count them twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, Row, delete, insert, select, update

from proxy.ledger.budgets import LEASE_PREFIX, SoftLimitCrossed
from proxy.ledger.commit import DEFAULT_SOFT_FRACTION, write_records
from proxy.ledger.counters import counters_for
from proxy.ledger.db import write_transaction
from proxy.ledger.journal import Start
from proxy.ledger.journal_replay import interrupted
from proxy.ledger.keys import lookup_key_by_id
from proxy.ledger.rates import drop_leases
from proxy.ledger.schema import BudgetHold, Instance
from proxy.logs import Trouble
from proxy.pricing.table import PriceTable
from proxy.types import PERIODS, Counter, Hold, Period, UsageRecord

logger = logging.getLogger("spendgate")


class Heartbeat:
    """This process's heartbeat, beaten from a thread of its own, and the reaper that runs beside it.

    The beat has its own thread, not a task of the event loop or a slot in its thread pool: a loop stalled by
    load (or a pool busy with ledger work) must not make a live process look dead, since the reaper would then
    record the holds of calls that are still running and their spend would count twice.
    """

    def __init__(
        self,
        engine: Engine,
        prices: PriceTable,
        instance: str,
        *,
        interval: float,
        limit: timedelta,
        soft_fraction: Decimal = DEFAULT_SOFT_FRACTION,
    ) -> None:
        self._engine = engine
        self._prices = prices
        self._instance = instance
        self._interval = interval
        self._limit = limit
        self._soft_fraction = soft_fraction
        self._beating_since: datetime | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once another replica took this process for dead and recorded its calls at their estimate.
        self.taken_for_dead = False

    def start(self, now: datetime) -> None:
        """Register this process and start beating (blocking)."""
        register(self._engine, self._instance, now)
        self._beating_since = now
        self._thread = threading.Thread(target=self._beat_until_stopped, name="spendgate-heartbeat", daemon=True)
        self._thread.start()

    def reap(self, now: datetime) -> list[SoftLimitCrossed]:
        """Record the calls of processes that stopped beating (blocking); only once this process has itself beaten
        for a whole limit: after a ledger outage every heartbeat is stale, and the other replicas must get their
        chance to beat first. Returns the soft limits those records crossed."""
        since = self._beating_since
        if since is None or now - since < self._limit:
            return []
        return reap(self._engine, self._prices, now, limit=self._limit, soft_fraction=self._soft_fraction)

    def stop(self) -> None:
        """A clean exit, once every call of this process is recorded (blocking)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        retire(self._engine, self._instance)

    def _beat_until_stopped(self) -> None:
        trouble = Trouble(logger, "beating this process's heartbeat")
        while not self._stopping.wait(self._interval):
            try:
                if not beat(self._engine, self._instance):
                    self.taken_for_dead = True
            except Exception as exc:
                self._beating_since = None
                trouble.failed(exc, detail=f" (it beats every {self._interval:g} s)")
                continue
            trouble.succeeded()
            if self._beating_since is None:
                self._beating_since = datetime.now(UTC)


def register(engine: Engine, instance: str, now: datetime) -> None:
    """Announce a serving process (blocking)."""
    with engine.begin() as connection:
        connection.execute(delete(Instance).where(Instance.id == instance))
        connection.execute(insert(Instance).values(id=instance, started_at=now, heartbeat_at=now))


def beat(engine: Engine, instance: str) -> bool:
    """Say this process is alive (blocking). False when a reaper had taken it for dead (it registers again)."""
    with write_transaction(engine) as connection:
        # The time of the write itself, taken once the write lock is ours: a beat that waited for the lock must
        # not be written as older than it is.
        now = datetime.now(UTC)
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


def reap(
    engine: Engine,
    prices: PriceTable,
    now: datetime,
    *,
    limit: timedelta,
    soft_fraction: Decimal = DEFAULT_SOFT_FRACTION,
) -> list[SoftLimitCrossed]:
    """Turn the holds of processes whose heartbeat is older than `limit` into `interrupted` records (blocking).

    Returns the soft limits those records crossed (their alerts are the caller's to send). The processes are
    claimed (deleted, locked in id order so that two reapers never deadlock) in the transaction that records their
    holds: a process that beats before the claim keeps its holds, and one claimed finds itself taken for dead at its
    next beat, never both. Safe on any number of replicas at once.
    """
    records: list[UsageRecord] = []
    crossed: list[SoftLimitCrossed] = []
    with write_transaction(engine) as connection:
        stale = select(Instance.id).where(Instance.heartbeat_at < now - limit).order_by(Instance.id)
        dead = list(connection.execute(stale.with_for_update()).scalars())
        if dead:
            connection.execute(delete(Instance).where(Instance.id.in_(dead)))
            holds = select(BudgetHold.__table__).where(BudgetHold.instance_id.in_(dead))
            calls: dict[str, list[Row[Any]]] = {}
            for row in connection.execute(holds):
                calls.setdefault(row.call_id, []).append(row)
            records = [_interrupted(rows, prices, now, _budgets(engine, rows[0])) for rows in calls.values()]
            if records:
                crossed = write_records(connection, records, soft_fraction=soft_fraction).crossed
        drop_leases(connection, dead, now)
    if records:
        logger.warning(
            "recorded %d calls of dead processes %s as interrupted at their held amount", len(records), ", ".join(dead)
        )
    return crossed


def _budgets(engine: Engine, hold: Row[Any]) -> dict[str, Counter]:
    """The counters of a held call's key as they stand now, by scope: their budgets and names, for the soft-limit
    alerts its record may set off (a lease covers no one call: none)."""
    key = lookup_key_by_id(engine, hold.key_id) if hold.key_id and not hold.call_id.startswith(LEASE_PREFIX) else None
    if key is None:
        return {}
    return {counter.scope: counter for counter in counters_for(key, hold.started_at or hold.period_start, hold.user)}


def _interrupted(
    holds: Sequence[Row[Any]], prices: PriceTable, now: datetime, budgets: dict[str, Counter]
) -> UsageRecord:
    first = holds[0]
    amount: Decimal = first.amount_usd
    # The counter as it stands now only where it is the one held (same period): spend goes where it was held.
    counters = tuple(
        counter
        if (counter := budgets.get(hold.scope)) is not None and counter.period_start == hold.period_start
        else Counter(
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
        feature=first.feature,
        user=first.user,
        endpoint=first.endpoint or "",
        model=first.model,
        streamed=False,
        max_tokens=None,
        input_bound=0,
        held=amount,
        metered=True,
        session=first.session,
        agent=first.agent,
        parent_agent=first.parent_agent,
    )
    hold = Hold(call_id=first.call_id, counters=counters, amount=amount, held=True)
    return interrupted(start, cost=amount, hold=hold, prices=prices)


def _period(scope: str) -> Period:
    period = scope.rsplit(":", 1)[-1]
    return next((known for known in PERIODS if known == period), "month")
