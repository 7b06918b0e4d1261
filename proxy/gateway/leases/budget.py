"""Budget leases: calls admitted in memory against a process's part of a key's budgets (its team's, its own and
its end user's counters, at once), the lifecycle of `proxy/gateway/leases/__init__.py`.

The writer takes each call's actual cost out of the lease in its batched transaction (`budgets.settle`). A lease
is a hold in the ledger like a call's own, so spent + held <= budget holds for every counter whoever leases or
holds: at every instant, what this process has admitted against a lease (calls in flight at their worst case,
plus finished calls whose records are not yet written) is at most the lease. When what is left is small beside
the call's worst case (`SMALL_BUDGET`), no lease is taken: the call takes its own hold, and refusals are exact.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial

import anyio.to_thread
from sqlalchemy import Engine

from proxy.gateway.leases.policy import SHARE, UPKEEP_SECONDS, Demand, grant_size
from proxy.gateway.waits import Turns
from proxy.instruments import Metrics
from proxy.ledger.budgets import LEASE_PREFIX, end_leases, grant_lease, return_lease
from proxy.ledger.keys import KeyInfo
from proxy.types import Counter, HoldOwner, UsageRecord

ZERO = Decimal(0)
# A grant covers at least this many worst cases of the call asking.
LEASE_CALLS = 8
# No lease while a budget has less left than this many worst cases (a grant of LEASE_CALLS would be more than its
# share): the call takes its own hold then.
SMALL_BUDGET = LEASE_CALLS * SHARE
Slot = tuple[str, tuple[tuple[str, datetime], ...]]
LeaseNote = Callable[[str, Sequence[Counter], datetime], None]


@dataclass(slots=True, eq=False)
class BudgetLease:
    """This process's lease of one key's budgets, and what it has admitted against it."""

    id: str
    granted: Decimal = ZERO  # in the ledger, as far as this process's own writes go
    in_flight: Decimal = ZERO  # worst cases of calls admitted and still running
    unwritten: Decimal = ZERO  # actual costs of finished calls whose records are not written yet
    returning: Decimal = ZERO  # being given back right now
    demand: Demand[Decimal] = field(default_factory=lambda: Demand.none(ZERO))  # worst cases admitted
    small_until: float = 0.0  # until then (monotonic), the budget is too small for leasing: per-call holds
    turns: Turns = field(default_factory=Turns)  # its grants, one at a time

    @property
    def available(self) -> Decimal:
        """What calls may still be admitted against."""
        return self.granted - self.in_flight - self.unwritten - self.returning

    def take(self, amount: Decimal) -> str:
        self.in_flight += amount
        self.demand.took(amount)
        return self.id


class BudgetLeases:
    """This process's budget leases: admission against them on the request path, upkeep in the background."""

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
        self._engine = engine
        self._metrics = metrics
        self._instance = instance
        self._ttl = ttl
        self._wait = wait_seconds
        self._note = note
        self._slots: dict[Slot, BudgetLease] = {}
        self._by_id: dict[str, BudgetLease] = {}

    async def admit(self, key: KeyInfo, counters: tuple[Counter, ...], amount: Decimal, *, endpoint: str) -> str | None:
        """Admit a call of worst case `amount` against this process's lease of the key's budgets, growing it in
        the ledger when needed; the lease id, or None when the budgets have too little left for leasing (the
        call then takes its own hold)."""
        budgeted = tuple(counter for counter in counters if counter.budget_usd is not None)
        slot = (key.key_id, tuple((counter.scope, counter.period_start) for counter in budgeted))
        lease = self._slots.get(slot)
        if lease is not None and lease.available >= amount:
            return lease.take(amount)
        if lease is not None and lease.small_until > time.monotonic():
            return None  # the budget was found small a moment ago: no transaction to learn it again
        if lease is None:
            lease = BudgetLease(id=f"{LEASE_PREFIX}{secrets.token_hex(12)}")
            self._slots[slot] = lease
            self._by_id[lease.id] = lease
            self._note(lease.id, budgeted, datetime.now(UTC))
        # Grown one grant at a time; a call whose wait runs out is refused and the grant still lands in the lease.
        await lease.turns.run(partial(self._grow, lease, key, budgeted, amount, endpoint), self._wait)
        return lease.take(amount) if lease.available >= amount else None

    async def _grow(
        self, lease: BudgetLease, key: KeyInfo, budgeted: tuple[Counter, ...], amount: Decimal, endpoint: str
    ) -> None:
        """Grow the lease in the ledger so that it can admit `amount`, unless another call's grant already did."""
        if lease.available >= amount:
            return
        now = datetime.now(UTC)
        owner = HoldOwner(instance_id=self._instance, team=key.team, key_id=key.key_id, endpoint=endpoint, model=None)
        size = partial(_grant, amount=amount, per_second=lease.demand.recent())
        grow = partial(
            grant_lease, self._engine, lease.id, budgeted, size, owner=owner, now=now, expires_at=now + self._ttl
        )
        granted = await anyio.to_thread.run_sync(grow)
        self._metrics.round_trips.labels("lease_grant").inc()
        lease.granted += granted
        if not granted:
            lease.small_until = time.monotonic() + UPKEEP_SECONDS

    def finished(self, record: UsageRecord) -> None:
        """A call admitted under a lease ended: its worst case is no longer in flight, its cost is owed."""
        lease = self._lease_of(record)
        if lease is None or record.hold is None:
            return
        lease.in_flight -= record.hold.amount
        lease.unwritten += max(record.cost_usd or ZERO, ZERO)

    def committed(self, records: Sequence[UsageRecord]) -> None:
        """The writer wrote these records: their costs left the leases in the ledger."""
        for record in records:
            lease = self._lease_of(record)
            if lease is None:
                continue
            cost = max(record.cost_usd or ZERO, ZERO)
            lease.unwritten -= cost
            lease.granted = max(lease.granted - cost, ZERO)

    async def upkeep(self) -> None:
        """Give back what the recent demand does not need, and end leases nobody used for a while."""
        now = time.monotonic()
        for slot, lease in list(self._slots.items()):
            lease.demand.measure()
            if lease.turns.busy:
                continue  # growing right now
            if lease.demand.idle(now) and lease.in_flight == 0 and lease.unwritten == 0:
                # Out of the slots first, so no call is admitted against it while it ends; back in if it cannot.
                del self._slots[slot]
                try:
                    await self._give_back(lease, None)
                except BaseException:
                    self._slots.setdefault(slot, lease)
                    raise
                del self._by_id[lease.id]
                continue
            # Given back only past twice what is kept, so a steady load does not churn.
            keep = lease.demand.keep()
            if lease.available > 2 * keep:
                await self._give_back(lease, lease.available - keep)

    async def close(self) -> None:
        """At a clean exit, once every record is written: end every lease of this process."""
        self._slots.clear()
        self._by_id.clear()
        await anyio.to_thread.run_sync(end_leases, self._engine, self._instance)
        self._metrics.round_trips.labels("lease_end").inc()

    def forget(self) -> None:
        """Another replica took this process for dead and recorded its leases: admit nothing more against them."""
        self._slots.clear()

    def _lease_of(self, record: UsageRecord) -> BudgetLease | None:
        hold = record.hold
        return self._by_id.get(hold.lease) if hold is not None and hold.lease is not None else None

    async def _give_back(self, lease: BudgetLease, amount: Decimal | None) -> None:
        back = lease.available if amount is None else amount
        lease.returning += back
        try:
            await anyio.to_thread.run_sync(return_lease, self._engine, lease.id, amount)
            self._metrics.round_trips.labels("lease_return").inc()
            lease.granted -= back
        finally:
            lease.returning -= back


def _grant(left: Decimal, *, amount: Decimal, per_second: Decimal) -> Decimal:
    """How much to lease, given what the tightest budget has left: nothing when that is small beside the call."""
    if left < amount * SMALL_BUDGET:
        return ZERO
    return grant_size(amount * LEASE_CALLS, per_second, left / SHARE)
