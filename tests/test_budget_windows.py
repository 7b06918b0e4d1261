"""Stacked budget windows (a daily, a weekly and a monthly allowance at once, on teams, keys and end users) and
the budget edge (`--budget-edge clamp`): every window is held and settled like a budget of its own."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, delete, select

from proxy.cli.main import main
from proxy.errors import BudgetExceeded
from proxy.gateway.limits import MIN_EDGE_TOKENS, most_tokens_within
from proxy.ledger.budgets import settle, take_hold
from proxy.ledger.commit import insert_records
from proxy.ledger.counters import counters_for
from proxy.ledger.db import write_transaction
from proxy.ledger.end_users import list_users, set_user_budget
from proxy.ledger.key_admin import create_key
from proxy.ledger.keys import lookup_key_by_id
from proxy.ledger.schema import APIKey, BudgetCounter, BudgetHold, Team, UserBudget
from proxy.ledger.teams import TeamSettings, create_team, get_team, update_team
from proxy.ledger.windows import WindowChange, period_end, period_start
from proxy.types import Counter, Hold, Period, UsageRecord
from tests.stack import Stack, running_stack
from tests.test_writer import make_record
from tests.waiting import wait_until

HELLO: list[MessageParam] = [{"role": "user", "content": "Hello"}]
# What the fake upstream's answer costs on Sonnet 4.6: 406 input x $3/M + 50 output x $15/M.
COST = Decimal("0.001968")


def ask(stack: Stack, *, max_tokens: int = 100, user: str | None = None) -> httpx.Response:
    """One call through spendgate, as the SDK makes it; the raw answer."""
    headers = {"x-api-key": stack.key, "anthropic-version": "2023-06-01"}
    if user is not None:
        headers["x-spendgate-user"] = user
    body = {"model": "claude-sonnet-4-6", "max_tokens": max_tokens, "messages": HELLO}
    return httpx.post(f"{stack.url}/v1/messages", headers=headers, json=body, timeout=30)


def test_a_daily_window_refuses_with_its_reset_while_the_month_has_room(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    team = TeamSettings(budget_usd=Decimal(1), windows={"day": Decimal("0.004")})
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        assert [ask(stack).status_code for _ in range(2)] == [200, 200]
        refused = ask(stack)
        tomorrow = period_start("day", datetime.now(UTC) + timedelta(days=1))
        assert tomorrow is not None
        reset = tomorrow.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert refused.status_code == 402
        assert refused.headers["x-should-retry"] == "false"
        assert refused.headers["x-spendgate-budget-window"] == "daily"
        assert refused.headers["x-spendgate-budget-resets-at"] == reset
        message = refused.json()["error"]["message"]
        assert f"team research has left today (daily; resets {reset})" in message
        # The SDK shows the same words and does not retry.
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key) as client:
            with pytest.raises(anthropic.APIStatusError, match=r"daily; resets") as error:
                client.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=HELLO)
        assert error.value.status_code == 402
        stack.idle()
        assert len(stack.upstream.requests) == 2
        view = get_team(engine, "research")
    windows = {window.period: window for window in view.windows}
    assert set(windows) == {"day", "month"}
    assert windows["day"].spent_usd == windows["month"].spent_usd == 2 * COST
    assert windows["day"].remaining_usd == Decimal("0.004") - 2 * COST
    assert windows["day"].resets_at == tomorrow and windows["month"].budget_usd == 1
    assert (view.budget_usd, view.period, view.spent_usd) == (Decimal(1), "month", 2 * COST)


def test_each_end_user_has_every_window_of_theirs(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(user_windows={"day": Decimal("0.004"), "month": Decimal("0.006")})
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        # Before the first call, so the proxy's key cache knows it from the start.
        set_user_budget(engine, "research", "bob", WindowChange(windows={"day": Decimal(1)}), actor="test")
        # ann: two calls fit the day, the third not.
        assert [ask(stack, user="ann").status_code for _ in range(3)] == [200, 200, 402]
        # bob's own row starts from the team's per-user windows: a bigger day, the same month.
        statuses = [ask(stack, user="bob") for _ in range(4)]
        assert [response.status_code for response in statuses] == [200, 200, 200, 402]
        assert statuses[-1].headers["x-spendgate-budget-window"] == "monthly"
        stack.idle()
        views = {view.user: view for view in list_users(engine, "research")}
    assert {window.period: window.budget_usd for window in views["bob"].windows} == {
        "day": Decimal(1),
        "month": Decimal("0.006"),
    }
    assert {window.period: window.spent_usd for window in views["ann"].windows} == {"day": 2 * COST, "month": 2 * COST}


def test_clamping_at_the_budget_edge_sends_what_the_tightest_window_can_pay(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    # 64,000 output tokens on Sonnet 4.6 could cost $0.96: a $0.05 day cannot hold that, a few thousand tokens fit.
    team = TeamSettings(windows={"day": Decimal("0.05"), "week": Decimal(10)}, budget_edge="clamp")
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        answered = ask(stack, max_tokens=64_000)
        assert answered.status_code == 200
        clamped = int(answered.headers["x-spendgate-clamped-max-tokens"])
        assert 1_024 <= clamped < 64_000
        sent = json.loads(stack.upstream.requests[-1].body)
        assert sent["max_tokens"] == clamped
        # About what $0.05 buys at $15 per million output tokens, less the input's worst case.
        assert 2_000 < clamped < 3_334
        [record] = stack.records(1)
        assert (record["max_tokens_requested"], record["max_tokens_sent"]) == (64_000, clamped)
        # A call that already fits goes out as asked, without the header.
        small = ask(stack, max_tokens=100)
        assert small.status_code == 200 and "x-spendgate-clamped-max-tokens" not in small.headers
        # Too little left for even 1,024 tokens of answer: refused as before.
        update_team(engine, "research", TeamSettings(windows={"day": Decimal("0.01")}), actor="test")
        refused = _after_cache(stack, max_tokens=64_000)
        assert refused.status_code == 402
        assert refused.headers["x-spendgate-budget-window"] == "daily"


def _after_cache(stack: Stack, **options: Any) -> httpx.Response:
    """A call once the proxy's key cache has seen the team's new rules."""
    answers: list[httpx.Response] = []

    def refused() -> bool:
        answers.append(ask(stack, **options))
        return answers[-1].status_code != 200

    wait_until(refused, "the new daily window in force")
    return answers[-1]


def test_a_team_that_refuses_at_the_edge_never_clamps(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(windows={"day": Decimal("0.05")})
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        refused = ask(stack, max_tokens=64_000)
        assert refused.status_code == 402
        assert "x-spendgate-clamped-max-tokens" not in refused.headers
        assert stack.upstream.requests == []


def test_window_options_on_the_command_line(engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> Any:
        assert main([*argv, "--db", db_url]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    created = run(
        "teams", "create", "fleet", "--daily-budget", "10", "--monthly-budget", "100", "--budget-edge", "clamp"
    )
    assert [(w["window"], w["budget_usd"]) for w in created["windows"]] == [("daily", "10"), ("monthly", "100")]
    # `--daily-budget` and `--monthly-budget` name the same windows as the shorthand would.
    assert (created["budget_usd"], created["period"], created["budget_edge"]) == ("100", "month", "clamp")
    # `--period` alone moves the shorthand budget, as it always did; the day keeps its own.
    moved = run("teams", "update", "fleet", "--period", "week")
    assert [(w["window"], w["budget_usd"]) for w in moved["windows"]] == [("daily", "10"), ("weekly", "100")]
    cleared = run("teams", "update", "fleet", "--daily-budget", "none", "--user-daily-budget", "2")
    assert [w["window"] for w in cleared["windows"]] == ["weekly"]
    assert cleared["user_windows"] == {"daily": "2"}
    user = run("teams", "user-budget", "fleet", "ann", "--monthly-budget", "30")
    assert [(w["window"], w["budget_usd"]) for w in user["windows"]] == [("daily", "2"), ("monthly", "30")]
    key = run("keys", "create", "--team", "fleet", "--daily-budget", "1", "--format", "json")
    assert key["windows"] == {"daily": "1"}
    info = lookup_key_by_id(engine, key["id"])
    assert info is not None and info.key_windows == {"day": Decimal(1)}
    assert info.team_windows == {"week": Decimal(100)} and info.budget_edge == "clamp"
    updated = run("keys", "update", key["id"], "--monthly-budget", "3", "--daily-budget", "none")
    assert updated["windows"] == {"monthly": "3"}
    # The same window twice is a usage error, not a silent choice.
    assert (
        main(["teams", "update", "fleet", "--budget", "5", "--period", "day", "--daily-budget", "6", "--db", db_url])
        != 0
    )
    assert "is given twice" in capsys.readouterr().err
    # So is the shorthand's own window named as a window, its period not given but known.
    run("teams", "update", "fleet", "--period", "day", "--budget", "5")
    assert main(["teams", "update", "fleet", "--budget", "7", "--daily-budget", "6", "--db", db_url]) != 0
    assert "is given twice" in capsys.readouterr().err


# --- Property: any interleaving of calls and window ends overruns no window, and counters equal records. ---

START = datetime(2026, 12, 6, 22, 0, tzinfo=UTC)  # a Sunday: the day, week and month end within a few days
Step = tuple[str, int, int]  # ("call", hours ahead, cents) or ("end", call index, cents actually spent)


@st.composite
def scripts(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    started = 0
    for _ in range(draw(st.integers(1, 25))):
        if started and draw(st.booleans()):
            steps.append(("end", draw(st.integers(0, started - 1)), draw(st.integers(0, 100))))
        else:
            steps.append(("call", draw(st.integers(0, 30)), draw(st.integers(1, 300))))
            started += 1
    return steps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=scripts())
def test_no_window_is_ever_overrun(engine: Engine, script: list[Step]) -> None:
    """Calls held at their worst case (cents) against a team's, a key's and a user's day, week and month, some ending
    at a fraction of it, the clock moving across window ends: every window's spent + held stays within its budget
    at every step, and what each counter says it spent is what the records that counted on it cost."""
    with write_transaction(engine) as connection:
        for table in (BudgetHold, BudgetCounter, UserBudget, APIKey, Team):
            connection.execute(delete(table))
    windows: dict[Period, Decimal | None] = {"day": Decimal("3"), "week": Decimal("5"), "month": Decimal("8")}
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(6), period="total", windows=windows), actor="t")
    update_team(engine, "research", TeamSettings(user_windows={"day": Decimal(2), "month": Decimal(7)}), actor="t")
    view, _ = create_key(
        engine, "research", actor="t", budget_usd=Decimal(4), period="week", windows={"day": Decimal("2.5")}
    )
    key = lookup_key_by_id(engine, view.id)
    assert key is not None
    now = START
    open_calls: dict[int, Hold] = {}
    costs: dict[str, list[tuple[Counter, Decimal]]] = {}
    seen: dict[tuple[str, datetime], Counter] = {}
    for number, (kind, first, second) in enumerate(script):
        if kind == "call":
            now += timedelta(hours=first)
            counters = counters_for(key, now, "ann")
            hold = Hold(call_id=f"call-{number}", counters=counters, amount=Decimal(second) / 100, held=True)
            try:
                take_hold(engine, hold, expires_at=now + timedelta(hours=1), started_at=now)
            except BudgetExceeded:
                continue
            open_calls[number] = hold
            seen.update({(counter.scope, counter.period_start): counter for counter in counters})
        elif open_calls:
            hold = open_calls.pop(sorted(open_calls)[first % len(open_calls)])
            cost = min(hold.amount, Decimal(second) / 100)
            with write_transaction(engine) as connection:
                settle(connection, [_record(hold, cost)], soft_fraction=Decimal(1), release=[hold.call_id])
            for counter in hold.counters:
                costs.setdefault(counter.scope + counter.period_start.isoformat(), []).append((counter, cost))
        rows = _counter_rows(engine)
        for where, counter in seen.items():
            spent, held = rows.get(where, (Decimal(0), Decimal(0)))
            if counter.budget_usd is not None:
                assert spent + held <= counter.budget_usd, f"{counter.label} {counter.period} overrun"
    # Every counter says it spent what the calls settled on it cost, and holds what the calls still open hold.
    rows = _counter_rows(engine)
    for where, counter in seen.items():
        settled = sum((cost for _, cost in costs.get(counter.scope + counter.period_start.isoformat(), [])), Decimal(0))
        still_held = sum(
            (
                hold.amount
                for hold in open_calls.values()
                if counter in hold.counters and counter.budget_usd is not None
            ),
            Decimal(0),
        )
        assert rows.get(where, (Decimal(0), Decimal(0))) == (settled, still_held)


def _counter_rows(engine: Engine) -> dict[tuple[str, datetime], tuple[Decimal, Decimal]]:
    query = select(BudgetCounter.scope, BudgetCounter.period_start, BudgetCounter.spent_usd, BudgetCounter.reserved_usd)
    with engine.connect() as connection:
        return {(scope, start): (spent, held) for scope, start, spent, held in connection.execute(query)}


def _record(hold: Hold, cost: Decimal) -> UsageRecord:
    return make_record(id=hold.call_id, user="ann", cost_usd=cost, hold=hold)


def test_window_bounds_follow_the_calendar() -> None:
    sunday = datetime(2026, 12, 6, 23, 59, tzinfo=UTC)
    periods: list[Period] = ["day", "week", "month"]
    starts = [period_start(period, sunday) for period in periods]
    assert starts == [
        datetime(2026, 12, 6, tzinfo=UTC),
        datetime(2026, 11, 30, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    ]
    assert [period_end(period, start) for period, start in zip(periods, starts, strict=True) if start] == [
        datetime(2026, 12, 7, tzinfo=UTC),
        datetime(2026, 12, 7, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    ]


def test_windows_through_the_admin_api(engine: Engine, db_url: str, tmp_path: Path) -> None:
    auth = {"authorization": "Bearer admin-secret"}
    with running_stack(engine, db_url, tmp_path, admin_token="admin-secret") as stack:
        with httpx.Client(base_url=stack.url, headers=auth) as admin:
            body = {"daily_budget_usd": "2", "monthly_budget_usd": 40, "user_weekly_budget_usd": "5"}
            team = admin.patch("/admin/teams/research", json={**body, "budget_edge": "clamp"}).json()
            assert [(w["window"], w["budget_usd"]) for w in team["windows"]] == [("daily", "2"), ("monthly", "40")]
            assert (team["user_windows"], team["budget_edge"]) == ({"weekly": "5"}, "clamp")
            same = admin.patch("/admin/teams/research", json={"budget_usd": 1, "period": "day", "daily_budget_usd": 2})
            assert same.status_code == 400 and "given twice" in same.json()["error"]["message"]
            assert admin.patch("/admin/teams/research", json={"daily_budget_usd": "-1"}).status_code == 400
            created = admin.post("/admin/teams/research/keys", json={"weekly_budget_usd": "3", "budget_usd": 9}).json()
            assert created["windows"] == {"weekly": "3", "monthly": "9"}
            updated = admin.patch(f"/admin/keys/{created['id']}", json={"weekly_budget_usd": None, "period": "day"})
            assert updated.json()["windows"] == {"daily": "9"} and updated.json()["rpm"] is None
            user = admin.put(
                "/admin/teams/research/user-budgets", json={"user": "ann", "daily_budget_usd": "0.5"}
            ).json()
            assert [(w["window"], w["budget_usd"]) for w in user["windows"]] == [("daily", "0.5"), ("weekly", "5")]
            assert admin.put("/admin/teams/research/user-budgets", json={"user": "ann"}).status_code == 400
            openapi = admin.get("/admin/openapi.json").json()
            assert "daily_budget_usd" in json.dumps(openapi)


def test_moving_the_shorthand_never_replaces_a_window(engine: Engine) -> None:
    """`--period` alone moves the shorthand budget, as it always did, but never onto a window that has a budget:
    that would raise a cap (or drop one) without anyone asking. End users' own budgets move with the team."""
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(100), windows={"day": Decimal(10)}), actor="t")
    with pytest.raises(ValueError, match="cannot move to period day: there is a daily budget already"):
        update_team(engine, "research", TeamSettings(period="day"), actor="t")
    with pytest.raises(ValueError, match="cannot move to period day"):
        update_team(engine, "research", TeamSettings(period="day", windows={"day": Decimal(20)}), actor="t")
    own = WindowChange(budget=Decimal(20), windows={"day": Decimal(5)})
    set_user_budget(engine, "research", "ann", own, actor="t")
    moved = update_team(engine, "research", TeamSettings(period="week"), actor="t")
    assert {w.period: w.budget_usd for w in moved.windows} == {"day": Decimal(10), "week": Decimal(100)}
    [ann] = [view for view in list_users(engine, "research") if view.user == "ann"]
    assert {w.period: w.budget_usd for w in ann.windows} == {"day": Decimal(5), "week": Decimal(20)}
    # An end user's own budget that would be replaced stops the whole change.
    with pytest.raises(ValueError, match="end user 'ann': the budget per week cannot move to period day"):
        update_team(engine, "research", TeamSettings(period="day", windows={"day": None}), actor="t")
    assert get_team(engine, "research").period == "week"
    with pytest.raises(ValueError, match="not negative"):
        TeamSettings(windows={"day": Decimal("-0")})


def test_a_window_set_while_calls_are_in_flight_counts_them(engine: Engine) -> None:
    """Every calendar window is counted with a budget or not: a call admitted before its team had a daily budget
    still counts in the day when it ends, and the day's budget holds from what was really spent."""
    create_team(engine, "research", TeamSettings(), actor="t")
    view, _ = create_key(engine, "research", actor="t")
    before = lookup_key_by_id(engine, view.id)
    assert before is not None
    now = datetime.now(UTC)
    hold = Hold(call_id="early", counters=counters_for(before, now, "ann"), amount=Decimal(0), held=False)
    update_team(engine, "research", TeamSettings(windows={"day": Decimal(1)}), actor="t")
    with write_transaction(engine) as connection:
        settle(
            connection,
            [make_record(id="early", user="ann", cost_usd=Decimal("0.75"), hold=hold)],
            soft_fraction=Decimal(1),
        )
    [day] = get_team(engine, "research").windows
    assert (day.period, day.spent_usd, day.remaining_usd) == ("day", Decimal("0.75"), Decimal("0.25"))
    after = lookup_key_by_id(engine, view.id)
    assert after is not None
    with pytest.raises(BudgetExceeded, match="daily"):
        take_hold(
            engine,
            Hold(call_id="late", counters=counters_for(after, now, "ann"), amount=Decimal("0.5"), held=True),
            expires_at=now + timedelta(hours=1),
        )


def test_changing_the_period_recounts_end_users_with_budgets_of_their_own(engine: Engine) -> None:
    create_team(engine, "research", TeamSettings(), actor="t")
    set_user_budget(engine, "research", "ann", WindowChange(budget=Decimal("0.003")), actor="t")
    insert_records(
        engine,
        [
            make_record(id=f"sgr_{n}", user="ann", started_at=datetime.now(UTC), cost_usd=Decimal("0.002"))
            for n in range(2)
        ],
    )
    update_team(engine, "research", TeamSettings(period="week"), actor="t")
    [ann] = list_users(engine, "research")
    assert {w.period: w.spent_usd for w in ann.windows} == {"week": Decimal("0.004")}
    assert ann.remaining_usd == Decimal("-0.001")


@given(
    base=st.integers(0, 10_000),
    rate=st.integers(0, 50),
    jumps=st.lists(st.integers(MIN_EDGE_TOKENS, 4_000), max_size=3),
    left=st.integers(0, 300_000),
    below=st.integers(1, 4_001),
)
def test_the_clamp_finds_the_most_tokens_a_window_pays(
    base: int, rate: int, jumps: list[int], left: int, below: int
) -> None:
    """Whatever the worst case's shape (a price per token, or steps too): the answer is the largest max_tokens
    that fits, as trying each would find, in a few estimates when the worst case grows by a price per token."""
    calls: list[int] = []

    def worst(tokens: int) -> Decimal:
        calls.append(tokens)
        return Decimal(base + rate * tokens + 1_000 * sum(tokens >= jump for jump in jumps)) / 1_000_000

    budget = Decimal(left) / 1_000_000
    fitting = [n for n in range(MIN_EDGE_TOKENS, below) if worst(n) <= budget]
    calls.clear()
    assert most_tokens_within(worst, budget, below=below) == (max(fitting) if fitting else None)
    if not jumps and rate:
        assert len(calls) <= 4


def test_a_clamped_call_takes_only_its_clamped_output_from_the_rate_limit(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    team = TeamSettings(otpm=70_000, user_windows={"day": Decimal("0.05")}, budget_edge="clamp")
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        set_user_budget(engine, "research", "bob", WindowChange(windows={"day": Decimal(1)}), actor="test")
        answers: list[httpx.Response] = []
        headers = {"x-api-key": stack.key, "anthropic-version": "2023-06-01", "x-fake-gate": "1"}
        body = {"model": "claude-sonnet-4-6", "max_tokens": 64_000, "messages": HELLO}
        alice = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{stack.url}/v1/messages",
                    headers={**headers, "x-spendgate-user": "alice"},
                    json=body,
                    timeout=60,
                )
            )
        )
        alice.start()
        try:
            wait_until(lambda: len(stack.upstream.requests) == 1, "alice's clamped call in flight")
            clamped = json.loads(stack.upstream.requests[0].body)["max_tokens"]
            assert clamped < 64_000
            # 64,000 + 8,000 is over the 70,000 a minute; what alice can use, plus bob's, is not.
            assert ask(stack, max_tokens=8_000, user="bob").status_code == 200
        finally:
            stack.upstream.gate.set()
            alice.join(timeout=60)
        assert answers[0].headers["x-spendgate-clamped-max-tokens"] == str(clamped)
