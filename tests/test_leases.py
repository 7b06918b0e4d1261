"""Budget leases: calls admitted in memory against leases the ledger granted, never past a budget."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, delete, select

from proxy.errors import BudgetExceeded
from proxy.gateway.leases.budget import LEASE_CALLS, SMALL_BUDGET, BudgetLeases
from proxy.instruments import Metrics
from proxy.ledger.budgets import end_leases, grant_lease, return_lease, take_hold
from proxy.ledger.commit import insert_records
from proxy.ledger.counters import counters_for, current_spend
from proxy.ledger.keys import KeyInfo
from proxy.ledger.schema import BudgetCounter, BudgetHold
from proxy.types import Counter, Hold, HoldOwner
from tests.test_writer import make_record

NOW = datetime.now(UTC)
KEY = KeyInfo(key_id="key_1", team_id=1, team="research", team_windows={"month": Decimal(10)})
OWNER = HoldOwner(instance_id="test-1", team="research", key_id="key_1", endpoint="/v1/messages", model=None)
WORST = Decimal("0.01")
ZERO = Decimal(0)
EXAMPLES = itertools.count()


def counters(key: KeyInfo = KEY) -> tuple[Counter, ...]:
    return counters_for(key, NOW)


def spend(engine: Engine, key: KeyInfo = KEY) -> dict[str, tuple[Decimal, Decimal]]:
    return current_spend(engine, counters(key))


def leased(engine: Engine) -> dict[tuple[str, str], Decimal]:
    with engine.connect() as connection:
        rows = connection.execute(select(BudgetHold.call_id, BudgetHold.scope, BudgetHold.amount_usd)).all()
    return {(call_id, scope): amount for call_id, scope, amount in rows}


def grant(engine: Engine, lease: str, amount: str, key: KeyInfo = KEY) -> Decimal:
    return grant_lease(
        engine,
        lease,
        counters(key),
        lambda left: Decimal(amount),
        owner=OWNER,
        now=NOW,
        expires_at=NOW + timedelta(hours=1),
    )


def test_a_lease_is_a_hold_within_the_budget(engine: Engine) -> None:
    assert grant(engine, "lease-a", "6") == 6
    # Only what is left: 4 of the 10, whatever was asked.
    assert grant(engine, "lease-b", "6") == 4
    assert grant(engine, "lease-c", "1") == 0
    assert spend(engine)["team:1:month"] == (ZERO, Decimal(10))
    with pytest.raises(BudgetExceeded):
        take_hold(engine, Hold(call_id="sgr_1", counters=counters(), amount=WORST, held=True), expires_at=NOW)
    # The lease grows in place; the key has no budget, so only the team's counter is held.
    return_lease(engine, "lease-b", Decimal(3))
    assert grant(engine, "lease-b", "2") == 2
    assert leased(engine) == {("lease-a", "team:1:month"): 6, ("lease-b", "team:1:month"): 3}
    return_lease(engine, "lease-a", None)
    assert spend(engine)["team:1:month"] == (ZERO, Decimal(3))
    assert end_leases(engine, "test-1") == 1
    assert spend(engine)["team:1:month"] == (ZERO, ZERO)
    assert leased(engine) == {}


def test_recorded_costs_move_from_the_lease_to_spent(engine: Engine) -> None:
    both = replace(KEY, key_windows={"day": Decimal(5)}, key_period="day")
    grant(engine, "lease-a", "2", both)
    hold = Hold(call_id="sgr_1", counters=counters(both), amount=WORST, held=False, lease="lease-a")
    records = [
        make_record(id=f"sgr_{n}", cost_usd=Decimal("0.25"), hold=replace(hold, call_id=f"sgr_{n}")) for n in range(3)
    ]
    insert_records(engine, records)
    counted = spend(engine, both)
    budgeted = {scope: amounts for scope, amounts in counted.items() if scope in ("team:1:month", "key:key_1:day")}
    assert budgeted == {
        "team:1:month": (Decimal("0.75"), Decimal("1.25")),
        "key:key_1:day": (Decimal("0.75"), Decimal("1.25")),
    }
    # Every other window (no budget: never leased), the end user's among them, counts the spend too.
    others = {scope: amounts for scope, amounts in counted.items() if scope not in budgeted}
    assert len(others) == 7 and set(others.values()) == {(Decimal("0.75"), ZERO)}
    assert sum(scope.startswith("user:1:") for scope in others) == 3
    assert set(leased(engine).values()) == {Decimal("1.25")}
    # Written again (an acknowledgement lost): nothing is taken twice.
    insert_records(engine, records)
    assert set(leased(engine).values()) == {Decimal("1.25")}
    # A lease already ended (its process reaped) gives nothing back: the cost is only spent.
    return_lease(engine, "lease-a", None)
    insert_records(engine, [make_record(id="sgr_9", cost_usd=Decimal(1), hold=replace(hold, call_id="sgr_9"))])
    assert spend(engine, both)["team:1:month"] == (Decimal("1.75"), ZERO)


@pytest.mark.anyio
async def test_calls_are_admitted_in_memory_until_the_lease_is_used(engine: Engine) -> None:
    noted: list[str] = []
    leases = BudgetLeases(
        engine, instance="test-1", ttl=timedelta(hours=1), note=lambda lease, *_: noted.append(lease), metrics=Metrics()
    )
    first = await leases.admit(KEY, counters(), WORST, endpoint="/v1/messages")
    assert first is not None and noted == [first]
    # One grant covers several calls: no more ledger rows change until it is used up.
    granted = leased(engine)[(first, "team:1:month")]
    assert granted >= WORST * LEASE_CALLS
    admitted = [await leases.admit(KEY, counters(), WORST, endpoint="/v1/messages") for _ in range(LEASE_CALLS - 1)]
    assert set(admitted) == {first}
    assert leased(engine)[(first, "team:1:month")] == granted
    await leases.close()
    assert leased(engine) == {}


@pytest.mark.anyio
async def test_a_cold_lease_under_a_burst_grows_with_the_demand(engine: Engine) -> None:
    # Before the first upkeep has measured the demand, a lease that runs out grows with what was just admitted:
    # a burst of calls at once takes a handful of grants, not one per LEASE_CALLS calls.
    metrics = Metrics()
    leases = BudgetLeases(engine, instance="test-1", ttl=timedelta(hours=1), note=lambda *_: None, metrics=metrics)
    large = replace(KEY, team_windows={"month": Decimal(1_000_000)})
    burst = 5_000
    admitted = [await leases.admit(large, counters(large), WORST, endpoint="/v1/messages") for _ in range(burst)]
    [lease] = set(admitted)
    assert lease is not None
    grants = metrics.registry.get_sample_value("spendgate_ledger_round_trips_total", {"operation": "lease_grant"})
    assert grants is not None and grants <= 6  # one per LEASE_CALLS calls would be 625
    # Within the budget all the same: held in the ledger covers every call admitted, and no more than its share.
    held = leased(engine)[(lease, "team:1:month")]
    assert WORST * burst <= held <= Decimal(1_000_000) / 4
    # Sums of what was admitted, never a rounded quotient: what goes back later cannot leave a residue.
    assert held == held.quantize(WORST)
    await leases.close()
    # Ended, the lease leaves the counter exactly as it found it: no rounding residue in what was held.
    assert spend(engine, large)["team:1:month"] == (ZERO, ZERO)


@pytest.mark.anyio
async def test_a_small_budget_gets_per_call_holds(engine: Engine) -> None:
    leases = BudgetLeases(engine, instance="test-1", ttl=timedelta(hours=1), note=lambda *_: None, metrics=Metrics())
    small = replace(KEY, team_windows={"month": WORST * (SMALL_BUDGET - 1)})
    assert await leases.admit(small, counters(small), WORST, endpoint="/v1/messages") is None
    assert leased(engine) == {}


@pytest.mark.anyio
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    worst=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=60),
    spent=st.lists(st.integers(min_value=0, max_value=100), min_size=60, max_size=60),
)
async def test_what_is_admitted_never_passes_the_budget(engine: Engine, worst: list[int], spent: list[int]) -> None:
    """Any sequence of calls (worst cases in cents) admitted by two processes, each finishing at a fraction of its
    worst case: at every step, spent + in flight at the worst case <= budget, and the counters end exact."""
    with engine.begin() as connection:
        connection.execute(delete(BudgetHold))
        connection.execute(delete(BudgetCounter))
    budget = Decimal(100)
    key = replace(KEY, team_windows={"month": budget})
    processes = [
        BudgetLeases(engine, instance=f"test-{n}", ttl=timedelta(hours=1), note=lambda *_: None, metrics=Metrics())
        for n in (1, 2)
    ]
    in_flight: list[tuple[int, Hold, Decimal]] = []
    total = Decimal(0)
    example = next(EXAMPLES)
    for n, cents in enumerate(worst):
        amount = Decimal(cents) / 100
        which = n % 2
        lease = await processes[which].admit(key, counters(key), amount, endpoint="/v1/messages")
        hold = Hold(
            call_id=f"sgr_{example}_{n}", counters=counters(key), amount=amount, held=lease is None, lease=lease
        )
        if lease is None:
            try:
                take_hold(engine, hold, expires_at=NOW + timedelta(hours=1))
            except BudgetExceeded:
                continue
        in_flight.append((which, hold, amount * spent[n] / 100))
        assert total + sum(h.amount for _, h, _ in in_flight) <= budget
        if n % 3 == 2:  # finish the oldest call, its record written at once
            owner, hold, cost = in_flight.pop(0)
            record = make_record(id=hold.call_id, cost_usd=cost, hold=hold)
            processes[owner].finished(record)
            insert_records(engine, [record])
            processes[owner].committed([record])
            total += cost
    for owner, hold, cost in in_flight:
        record = make_record(id=hold.call_id, cost_usd=cost, hold=hold)
        processes[owner].finished(record)
        insert_records(engine, [record])
        processes[owner].committed([record])
        total += cost
    for process in processes:
        await process.close()
    assert spend(engine, key)["team:1:month"] == (total, ZERO)
