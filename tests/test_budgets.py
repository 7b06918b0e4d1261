"""Budget holds in the ledger: atomic under concurrency, settled exactly, released when orphaned."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select

from proxy.errors import BudgetExceeded
from proxy.ledger.budgets import release_expired, take_hold
from proxy.ledger.commit import insert_records
from proxy.ledger.counters import TOTAL_PERIOD_START, current_spend, key_counter, team_counter
from proxy.ledger.schema import BudgetHold
from proxy.ledger.windows import period_start
from proxy.types import Counter, Hold
from tests.test_writer import make_record

NOW = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)  # a Wednesday
LATER = NOW + timedelta(hours=2)


def team(budget: str | None) -> Counter:
    return team_counter(1, "research", "month", None if budget is None else Decimal(budget), NOW)


def key(budget: str | None) -> Counter:
    return key_counter("key_1", "day", None if budget is None else Decimal(budget), NOW)


def hold(call_id: str, amount: str, *counters: Counter) -> Hold:
    return Hold(call_id=call_id, counters=counters, amount=Decimal(amount), held=True)


def holds(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(BudgetHold)).scalar_one())


@pytest.mark.parametrize(
    "period, start",
    [
        pytest.param("day", datetime(2026, 11, 25, tzinfo=UTC), id="day"),
        pytest.param("week", datetime(2026, 11, 23, tzinfo=UTC), id="week-starts-monday"),
        pytest.param("month", datetime(2026, 11, 1, tzinfo=UTC), id="month"),
        pytest.param("total", None, id="total"),
    ],
)
def test_calendar_periods_in_utc(period: str, start: datetime | None) -> None:
    assert period_start(period, NOW) == start
    # 01:00 on the 26th in UTC+3 is still the 25th in UTC.
    assert period_start(period, datetime(2026, 11, 26, 1, tzinfo=UTC) - timedelta(hours=3)) == start


def test_total_budget_counter_never_resets() -> None:
    counter = team_counter(1, "research", "total", Decimal(5), NOW)
    assert counter.period_start == TOTAL_PERIOD_START
    assert counter.scope == "team:1:total"


def test_hold_then_settle(engine: Engine) -> None:
    counters = (team("10"), key(None))
    take_hold(engine, hold("sgr_1", "3", *counters), expires_at=LATER)
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(0), Decimal(3))
    assert holds(engine) == 1
    record = make_record(id="sgr_1", cost_usd=Decimal("0.25"), hold=hold("sgr_1", "3", *counters))
    insert_records(engine, [record])
    spend = current_spend(engine, counters)
    assert spend["team:1:month"] == (Decimal("0.25"), Decimal(0))
    # A key without a budget still counts its spend.
    assert spend["key:key_1:day"] == (Decimal("0.25"), Decimal(0))
    assert holds(engine) == 0
    # Writing the same record again settles nothing twice.
    insert_records(engine, [record])
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal("0.25"), Decimal(0))


def test_over_budget_is_refused_and_holds_nothing(engine: Engine) -> None:
    take_hold(engine, hold("sgr_1", "4", team("10")), expires_at=LATER)
    with pytest.raises(BudgetExceeded) as refused:
        take_hold(engine, hold("sgr_2", "4.5", team("10"), key("1")), expires_at=LATER)
    message = refused.value.message
    assert "up to $4.5" in message
    assert (
        "key key_1 has left today (daily; resets 2026-11-26T00:00:00Z): budget $1, spent $0, reserved by calls"
        in message
    )
    # The team had room, but nothing was held on it either.
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(0), Decimal(4))
    with pytest.raises(
        BudgetExceeded,
        match=r"team research has left this month \(monthly; resets 2026-12-01T00:00:00Z\): budget \$10, spent \$0, ",
    ):
        take_hold(engine, hold("sgr_3", "6.01", team("10")), expires_at=LATER)
    take_hold(engine, hold("sgr_4", "6", team("10")), expires_at=LATER)
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(0), Decimal(10))
    assert holds(engine) == 2


def test_concurrent_holds_never_exceed_the_budget(engine: Engine) -> None:
    admitted: list[str] = []
    refused: list[str] = []

    def attempt(n: int) -> None:
        try:
            take_hold(engine, hold(f"sgr_{n}", "1", team("10")), expires_at=LATER)
            admitted.append(f"sgr_{n}")
        except BudgetExceeded:
            refused.append(f"sgr_{n}")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert (len(admitted), len(refused)) == (10, 15)
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(0), Decimal(10))


def test_expired_holds_are_released(engine: Engine) -> None:
    take_hold(engine, hold("sgr_1", "7", team("10")), expires_at=NOW + timedelta(minutes=5))
    take_hold(engine, hold("sgr_2", "2", team("10")), expires_at=NOW + timedelta(hours=5))
    assert release_expired(engine, NOW + timedelta(minutes=10)) == 1
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(0), Decimal(2))
    # The call settles after its hold was released: its cost counts, nothing is released twice.
    insert_records(engine, [make_record(id="sgr_1", cost_usd=Decimal(1), hold=hold("sgr_1", "7", team("10")))])
    assert current_spend(engine, [team("10")])["team:1:month"] == (Decimal(1), Decimal(2))
    assert release_expired(engine, NOW + timedelta(minutes=10)) == 0


def test_soft_limit_is_reported_once_per_period(engine: Engine) -> None:
    def settle(call_id: str, cost: str) -> list[str]:
        record = make_record(id=call_id, cost_usd=Decimal(cost), hold=hold(call_id, "0", team("10")))
        return [alert.label for alert in insert_records(engine, [record], soft_fraction=Decimal("0.8")).crossed]

    assert settle("sgr_1", "7.99") == []
    assert settle("sgr_2", "0.01") == ["team research"]
    assert settle("sgr_3", "1") == []
