"""End-user budgets: each end user of a team gets an allowance per period, held before and settled after, exactly
like team budgets."""

from __future__ import annotations

import contextlib
import json
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select, text

from proxy.cli.main import main
from proxy.gateway.call import label
from proxy.ledger.counters import NO_USER
from proxy.ledger.end_users import list_users, set_user_budget
from proxy.ledger.key_admin import create_key
from proxy.ledger.schema import UsageRow
from proxy.ledger.teams import Conflict, TeamSettings, create_team, update_team
from proxy.ledger.windows import WindowChange
from tests.conftest import POSTGRES_URL
from tests.replicas import replicas
from tests.servers import serve_in_thread
from tests.stack import Stack, running_stack
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

HELLO: list[MessageParam] = [{"role": "user", "content": "Hello"}]
# A prompt whose byte bound (~3,100 tokens) covers the 406 input tokens the fake upstream reports.
LONG: list[MessageParam] = [{"role": "user", "content": "x" * 3000}]
# What the fake upstream's answer costs on Sonnet 4.6: 406 input x $3/M + 50 output x $15/M.
COST = Decimal("0.001968")


def ask(stack: Stack, user: str | None = None, *, metadata_user: str | None = None, max_tokens: int = 100) -> int:
    """One SDK call (no retries) as `user`; its status."""
    headers = {"x-spendgate-user": user} if user is not None else {}
    extra: dict[str, Any] = {"metadata": {"user_id": metadata_user}} if metadata_user is not None else {}
    with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
        try:
            client.messages.create(
                model="claude-sonnet-4-6", max_tokens=max_tokens, messages=HELLO, extra_headers=headers, **extra
            )
        except anthropic.APIStatusError as exc:
            if exc.status_code == 402:
                assert exc.type == "billing_error"
                assert exc.response.headers["x-should-retry"] == "false"
            return exc.status_code
    return 200


def spent_by(engine: Engine, user: str) -> Decimal:
    with engine.connect() as connection:
        costs = connection.execute(select(UsageRow.cost_usd).where(UsageRow.user == user)).scalars().all()
    return sum((cost or Decimal(0) for cost in costs), Decimal(0))


def test_each_user_has_their_own_allowance(engine: Engine, db_url: str, tmp_path: Path) -> None:
    # A worst case is ~$0.0015 (Hello at 5m-write rates + 100 output tokens); $0.004 lets two calls settle, not 3.
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(user_budget_usd=Decimal("0.004"))) as stack:
        assert [ask(stack, "ann") for _ in range(3)] == [200, 200, 402]
        # Another user is untouched; the body's metadata.user_id names the user when the header does not.
        assert [ask(stack, metadata_user="bob") for _ in range(2)] == [200, 200]
        # The header wins over the body.
        assert ask(stack, "cat", metadata_user="ann") == 200
        stack.idle()
        records = stack.records(6)
        refused = [record for record in records if record["status"] == 402]
        assert [record["user"] for record in refused] == ["ann"]
        assert "user 'ann' of team research" in _message(stack, "ann")
        views = {view.user: view for view in list_users(engine, "research")}
    assert views["ann"].spent_usd == 2 * COST and views["ann"].remaining_usd == Decimal("0.004") - 2 * COST
    assert views["bob"].spent_usd == 2 * COST and views["cat"].spent_usd == COST
    assert all(view.reserved_usd == 0 and view.budget_usd == Decimal("0.004") for view in views.values())


def _message(stack: Stack, user: str) -> str:
    with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            client.messages.create(
                model="claude-sonnet-4-6", max_tokens=100, messages=HELLO, extra_headers={"x-spendgate-user": user}
            )
    return refused.value.message


def test_calls_without_a_user_share_one_allowance(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(user_budget_usd=Decimal("0.004"))) as stack:
        assert [ask(stack) for _ in range(3)] == [200, 200, 402]
        assert "calls without a user of team research" in _message(stack, "")
        assert ask(stack, "ann") == 200
        stack.idle()
        views = {view.user: view for view in list_users(engine, "research")}
    assert views[NO_USER].spent_usd == 2 * COST


def test_overrides_give_one_user_more_less_or_no_limit(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(
        engine, db_url, tmp_path, team=TeamSettings(user_budget_usd=Decimal("0.004")), key_cache_seconds=0
    ) as stack:
        set_user_budget(engine, "research", "ann", WindowChange(budget=Decimal("0.0001")), actor="test")
        set_user_budget(engine, "research", "vip", WindowChange(budget=None), actor="test")
        assert ask(stack, "ann") == 402
        assert [ask(stack, "vip") for _ in range(4)] == [200] * 4
        assert [ask(stack, "bob") for _ in range(3)] == [200, 200, 402]
        # Back to the team's per-user budget.
        view = set_user_budget(engine, "research", "ann", None, actor="test")
        assert (view.own_budget, view.budget_usd) == (False, Decimal("0.004"))
        assert ask(stack, "ann") == 200


def test_turning_user_budgets_on_mid_period_counts_what_users_already_spent(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    with running_stack(engine, db_url, tmp_path, key_cache_seconds=0) as stack:
        assert [ask(stack, "ann") for _ in range(2)] == [200, 200]
        stack.idle()
        update_team(engine, "research", TeamSettings(user_budget_usd=Decimal("0.005")), actor="test")
        # $0.003936 spent before the budget existed: one more worst case ($0.0015) does not fit.
        assert ask(stack, "ann") == 402
        assert ask(stack, "bob") == 200


def test_synchronised_first_calls_of_an_unknown_user_cannot_pass_a_tiny_budget(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """LiteLLM #40095: eight simultaneous first requests of a new end user all passed a $1e-9 budget."""
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(user_budget_usd=Decimal("0.000000001"))) as stack:
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(ask(stack, "new-user"))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [402] * 8
        assert stack.upstream.requests == []


@pytest.mark.parametrize(
    "budget, clients",
    [
        # 9 worst cases: per-call holds.
        pytest.param(Decimal("0.13"), 50, id="per-call-holds"),
        # 76 worst cases, more of ann's calls than that in flight at once: leases until fewer than 32 worst cases
        # are left, then per-call holds.
        pytest.param(Decimal("1.00"), 150, id="leases"),
    ],
)
def test_one_users_concurrent_calls_never_pass_their_budget(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal, clients: int
) -> None:
    """Many concurrent SDK calls of one user across replicas: their spend stays within their allowance, refused
    calls get 402 and are not retried, and another user calling at the same time is unaffected. The upstream holds
    every admitted call until all have been admitted or refused, so they are all in flight at once (a fixed hang
    let a slow machine spread them out until none was refused)."""
    create_team(engine, "research", TeamSettings(user_budget_usd=budget), actor="test")
    set_user_budget(engine, "research", "bob", WindowChange(budget=None), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    statuses: dict[str, list[int]] = {"ann": [], "bob": []}
    lock = threading.Lock()
    count = 1 if POSTGRES_URL is None else 2

    def call(url: str, user: str) -> None:
        with anthropic.Anthropic(base_url=url, api_key=key) as client:
            try:
                client.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=100,
                    messages=LONG,
                    extra_headers={"x-fake-gate": "1", "x-spendgate-user": user},
                )
                status = 200
            except anthropic.APIStatusError as exc:
                status = exc.status_code
        with lock:
            statuses[user].append(status)

    with serve_in_thread(upstream) as upstream_url, replicas(db_url, upstream_url, tmp_path, count) as urls:
        threads = [
            threading.Thread(target=call, args=(urls[n % count], "ann" if n % 5 else "bob")) for n in range(clients)
        ]
        for thread in threads:
            thread.start()

        def all_admitted_or_refused() -> bool:
            with lock:
                return len(upstream.requests) + sum(map(len, statuses.values())) == clients

        wait_until(all_admitted_or_refused, "every call admitted or refused", timeout=120)
        upstream.gate.set()
        for thread in threads:
            thread.join(timeout=120)
    assert set(statuses["ann"]) == {200, 402}
    assert set(statuses["bob"]) == {200}
    admitted = statuses["ann"].count(200) + statuses["bob"].count(200)
    assert len(upstream.requests) == admitted
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT retry_count FROM usage_records")).all()
    assert len(rows) == clients and {retry_count for (retry_count,) in rows} == {0}
    assert spent_by(engine, "ann") <= budget
    views = {view.user: view for view in list_users(engine, "research")}
    assert views["ann"].spent_usd == spent_by(engine, "ann")
    assert views["ann"].reserved_usd == 0 and views["bob"].reserved_usd == 0


def test_the_cli_sets_and_shows_user_budgets(engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> Any:
        assert main(["--db", db_url, *args]) == 0
        return capsys.readouterr().out

    cli("teams", "create", "research", "--user-budget", "5", "--rpm", "100", "--otpm", "none")
    cli("teams", "user-budget", "research", "ann", "--budget", "20")
    cli("teams", "user-budget", "research", "", "--budget", "none")
    users = json.loads(cli("teams", "users", "research", "--format", "json"))
    assert {user["user"]: (user["budget_usd"], user["own_budget"]) for user in users} == {
        "": (None, True),
        "ann": ("20", True),
    }
    [team] = json.loads(cli("teams", "list", "--format", "json"))
    assert (team["user_budget_usd"], team["rpm"], team["itpm"], team["otpm"]) == ("5", 100, None, None)
    cleared = json.loads(cli("teams", "user-budget", "research", "ann", "--clear"))
    assert (cleared["budget_usd"], cleared["own_budget"]) == ("5", False)
    key = json.loads(cli("keys", "create", "--team", "research", "--itpm", "5000", "--format", "json"))
    assert (key["rpm"], key["itpm"]) == (None, 5000)
    updated = json.loads(cli("keys", "update", key["id"], "--rpm", "7", "--itpm", "none"))
    assert (updated["rpm"], updated["itpm"]) == (7, None)
    with engine.connect() as connection:
        actions = connection.execute(text("SELECT action FROM admin_events ORDER BY seq")).scalars().all()
    assert actions == [
        "team.create",
        "team.user_budget",
        "team.user_budget",
        "team.user_budget",
        "key.create",
        "key.update",
    ]
    assert main(["--db", db_url, "teams", "update", "research", "--rpm", "0"]) == 1
    assert "positive whole number" in capsys.readouterr().err


def test_metrics_show_allow_listed_users_against_their_allowance(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(user_budget_usd=Decimal("0.004"), user_windows={"day": Decimal("0.003")})
    with running_stack(engine, db_url, tmp_path, team=team, metrics_token="t", metrics_users=("ann",)) as stack:
        assert [ask(stack, "ann"), ask(stack, "bob")] == [200, 200]
        stack.idle()
        exposition = httpx.get(f"{stack.url}/metrics", headers={"authorization": "Bearer t"}).text
    samples = {
        (sample.name, sample.labels.get("user"), sample.labels.get("period")): sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name.startswith("spendgate_user_budget")
        for sample in family.samples
    }
    assert samples == {
        ("spendgate_user_budget_limit_usd", "ann", None): 0.004,
        ("spendgate_user_budget_spent_usd", "ann", None): float(COST),
        ("spendgate_user_budget_held_usd", "ann", None): 0.0,
        # Each window of hers: the day's allowance is the tighter.
        ("spendgate_user_budget_window_limit_usd", "ann", "day"): 0.003,
        ("spendgate_user_budget_window_remaining_usd", "ann", "day"): float(Decimal("0.003") - COST),
        ("spendgate_user_budget_window_limit_usd", "ann", "month"): 0.004,
        ("spendgate_user_budget_window_remaining_usd", "ann", "month"): float(Decimal("0.004") - COST),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(max_size=300))
def test_any_user_id_is_stored_exactly_or_refused(engine: Engine, user: str) -> None:
    """An override names a user exactly as a call would (`label` of the header or metadata value), or is refused
    with a reason: never a 500, never a user no call can match."""
    with contextlib.suppress(Conflict):
        create_team(engine, "research", TeamSettings(user_budget_usd=Decimal(1)), actor="test")
    try:
        view = set_user_budget(engine, "research", user, WindowChange(budget=Decimal(2)), actor="test")
    except ValueError as refused:
        assert "valid Unicode" in str(refused)
        assert label(user, 256) != user
        return
    assert label(user, 256) == user == view.user
    assert view.budget_usd == 2 and view.own_budget
