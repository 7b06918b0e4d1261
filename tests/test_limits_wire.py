"""Spend limits, output caps and allow-lists end to end: the official SDK against the proxy and a fake upstream."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from sqlalchemy import Engine, text
from starlette.types import Receive, Scope, Send

from proxy.ledger.budgets import take_hold
from proxy.ledger.counters import team_counter
from proxy.ledger.instances import register
from proxy.ledger.key_admin import create_key
from proxy.ledger.keys import lookup_key_by_id
from proxy.ledger.teams import TeamSettings, create_team, get_team
from proxy.types import Hold, HoldOwner
from tests.conftest import POSTGRES_URL
from tests.replicas import replicas
from tests.servers import serve_in_thread
from tests.stack import Stack, running_stack
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def sdks() -> Iterator[list[anthropic.Anthropic]]:
    clients: list[anthropic.Anthropic] = []
    yield clients
    for client in clients:
        client.close()


def sdk(stack: Stack, clients: list[anthropic.Anthropic], **kwargs: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=stack.url, api_key=stack.key, **kwargs)
    clients.append(client)
    return client


def test_over_budget_is_402_and_not_retried(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal("0.0001"))) as stack:
        with pytest.raises(anthropic.APIStatusError) as refused:
            sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)
        assert refused.value.status_code == 402
        assert refused.value.type == "billing_error"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert refused.value.response.headers["x-spendgate-error"] == "budget_exceeded"
        assert "budget $0.0001, spent $0, reserved by calls in flight $0" in refused.value.message
        [record] = stack.records(1)
        assert stack.upstream.requests == []
    assert (record["status"], record["outcome"], record["error_type"]) == (402, "rejected", "budget_exceeded")


def test_key_budget_binds_too(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    with running_stack(engine, db_url, tmp_path, key_budget=Decimal("0.0001")) as stack:
        with pytest.raises(anthropic.APIStatusError, match="more than the key"):
            sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)


def test_spend_is_settled_and_listed(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal(1))) as stack:
        client = sdk(stack, sdks)
        client.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES) as stream:
            stream.until_done()
        stack.records(2)
    view = get_team(engine, "research")
    # 406 × $3 + 50 × $15, then 135 × $3 + 10 × $15 (per MTok).
    assert view.spent_usd == Decimal("0.002523")
    assert view.reserved_usd == 0
    assert view.remaining_usd == Decimal("0.997477")


def test_model_outside_the_allow_list_is_403(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    team = TeamSettings(models=("claude-haiku-4-5", "claude-sonnet-4-6"))
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        with pytest.raises(
            anthropic.PermissionDeniedError, match="Allowed models: claude-haiku-4-5, claude-sonnet-4-6"
        ):
            sdk(stack, sdks).messages.create(model="claude-opus-5", max_tokens=10, messages=MESSAGES)
        sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        records = stack.records(2)
    assert [(r["status"], r["error_type"]) for r in records] == [(403, "model_not_allowed"), (200, None)]


def test_output_cap_reject(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    team = TeamSettings(max_output_tokens=1000, cap_policy="reject")
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        with pytest.raises(anthropic.BadRequestError) as refused:
            sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=4096, messages=MESSAGES)
        assert refused.value.response.headers["x-spendgate-error"] == "output_cap"
        assert stack.upstream.requests == []


def test_output_cap_clamp(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(max_output_tokens=1000)) as stack:
        sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=4096, messages=MESSAGES)
        [record] = stack.records(1)
        assert json.loads(stack.upstream.requests[0].body)["max_tokens"] == 1000
    assert (record["max_tokens_requested"], record["max_tokens_sent"]) == (4096, 1000)


def test_global_default_cap(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    with running_stack(engine, db_url, tmp_path, default_max_output_tokens=512) as stack:
        sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=4096, messages=MESSAGES)
        assert json.loads(stack.upstream.requests[0].body)["max_tokens"] == 512


def test_unpriced_model(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal(10))) as stack:
        with pytest.raises(anthropic.BadRequestError, match="has no price") as refused:
            sdk(stack, sdks).messages.create(model="gpt-9", max_tokens=10, messages=MESSAGES)
        assert refused.value.response.headers["x-spendgate-error"] == "unpriced_model"
        assert stack.upstream.requests == []


def test_unpriced_model_without_budget_is_forwarded_and_flagged(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    with running_stack(engine, db_url, tmp_path) as stack:
        sdk(stack, sdks).messages.create(model="gpt-9", max_tokens=10, messages=MESSAGES)
        [record] = stack.records(1)
    assert (record["cost_usd"], record["price_source"]) == (None, "unpriced")


@contextlib.contextmanager
def table_gone(engine: Engine, table: str) -> Iterator[None]:
    """Make one ledger table unreachable for the proxy (renamed away, then back)."""
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE {table} RENAME TO {table}_away"))
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE {table}_away RENAME TO {table}"))


def test_ledger_down_fails_closed(engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal(10))) as stack:
        with table_gone(engine, "budget_counters"), pytest.raises(anthropic.InternalServerError) as refused:
            sdk(stack, sdks, max_retries=0).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["x-spendgate-error"] == "ledger_unavailable"
        assert stack.upstream.requests == []


def test_ledger_down_can_fail_open(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    team = TeamSettings(budget_usd=Decimal(10))
    with running_stack(engine, db_url, tmp_path, team=team, budget_fail_open=True) as stack:
        with table_gone(engine, "budget_holds"):
            sdk(stack, sdks).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        assert len(stack.upstream.requests) == 1


class Webhook:
    """A receiver for alert webhooks: records each JSON body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append(json.loads(body))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_soft_limit_alert_is_posted_once(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    webhook = Webhook()
    team = TeamSettings(budget_usd=Decimal("0.009"))
    with (
        serve_in_thread(webhook) as hook_url,
        running_stack(engine, db_url, tmp_path, team=team, alert_webhook=hook_url) as stack,
    ):
        client = sdk(stack, sdks)
        for _ in range(4):
            client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        stack.records(4)
    # $0.001968 a call: the fourth crosses 80% of $0.009 ($0.0072).
    assert webhook.received == [
        {
            "event": "soft_limit_crossed",
            "team": "research",
            "period": "month",
            "period_start": webhook.received[0]["period_start"],
            "spent_usd": "0.007872",
            "budget_usd": "0.009",
            "fraction": "0.8",
        }
    ]


def test_a_dead_replicas_calls_set_off_their_soft_limit_alert(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """The reaper records a dead replica's held call at its worst case: when that crosses the soft limit, the alert
    goes out like any other (the reaper's records dropped it before, as did replays of journals and spills)."""
    webhook = Webhook()
    team = TeamSettings(budget_usd=Decimal(10))
    beats: dict[str, Any] = {"heartbeat_seconds": 0.1, "heartbeat_limit_seconds": 0.5}
    with (
        serve_in_thread(webhook) as hook_url,
        running_stack(engine, db_url, tmp_path, team=team, alert_webhook=hook_url, **beats) as stack,
    ):
        now = datetime.now(UTC)
        key = lookup_key_by_id(engine, stack.key_id)
        assert key is not None
        counter = team_counter(key.team_id, "research", "month", Decimal(10), now)
        owner = HoldOwner(
            instance_id="dead-replica", team="research", key_id=stack.key_id, endpoint="/v1/messages", model=None
        )
        hold = Hold(call_id="sgr_dead_call", counters=(counter,), amount=Decimal(9), held=True)
        take_hold(engine, hold, expires_at=now + timedelta(hours=1), started_at=now, owner=owner)
        # Registered last: a reaper that came between would have claimed it with no holds yet, leaving the hold to
        # a process nobody reaps (a hold outlives its process only if the process dies after being claimed).
        register(engine, "dead-replica", now - timedelta(hours=1))
        wait_until(lambda: webhook.received, "the soft-limit alert of the dead replica's call")
    [alert] = webhook.received
    assert (alert["team"], alert["spent_usd"], alert["budget_usd"]) == ("research", "9", "10")


# A long prompt: its byte-bound (≈3,100 input tokens) covers the fake upstream's fixed 406 reported tokens.
LONG: list[MessageParam] = [{"role": "user", "content": "x" * 3000}]
# Sonnet 4.6 worst case ≈ 3,1xx tokens at the $3.75 5m-write rate + 100 × $15 = ≈ $0.0131.
WORST = Decimal("0.0131")


@pytest.mark.parametrize(
    "budget, clients",
    [
        # 9 worst cases: every call takes its own hold, and exactly the calls that fit are admitted.
        pytest.param(Decimal("0.13"), 50, id="per-call-holds"),
        # 76 worst cases, more calls than that in flight: calls are admitted against leases until less than 32
        # worst cases are left, then with their own holds.
        pytest.param(Decimal("1.00"), 150, id="leases"),
    ],
)
def test_budget_holds_under_concurrency_across_replicas(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal, clients: int
) -> None:
    # The upstream holds every admitted call until all have been admitted or refused: all are in flight at once.
    create_team(engine, "research", TeamSettings(budget_usd=budget), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    statuses: list[int] = []
    lock = threading.Lock()
    count = 1 if POSTGRES_URL is None else 2

    def call(url: str) -> None:
        with anthropic.Anthropic(base_url=url, api_key=key) as client:
            try:
                client.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=100,
                    messages=LONG,
                    extra_headers={"x-fake-gate": "1"},
                )
                status = 200
            except anthropic.APIStatusError as exc:
                status = exc.status_code
        with lock:
            statuses.append(status)

    with serve_in_thread(upstream) as upstream_url, replicas(db_url, upstream_url, tmp_path, count) as urls:
        threads = [threading.Thread(target=call, args=(urls[n % count],)) for n in range(clients)]
        for thread in threads:
            thread.start()

        def all_admitted_or_refused() -> bool:
            with lock:
                return len(upstream.requests) + len(statuses) == clients

        wait_until(all_admitted_or_refused, "every call admitted or refused", timeout=120)
        upstream.gate.set()
        for thread in threads:
            thread.join(timeout=120)
    admitted = statuses.count(200)
    assert sorted(set(statuses)) == [200, 402]
    # At least the worst cases that fit; leases may refuse some of those while other replicas hold unused leases.
    assert admitted >= (9 if budget == Decimal("0.13") else 76 // 2), statuses
    # Refused calls were not retried: the upstream saw only the admitted ones, and there is one record per call.
    assert len(upstream.requests) == admitted
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT cost_usd, status, retry_count FROM usage_records")).all()
    assert len(rows) == clients
    assert {retry_count for _, _, retry_count in rows} == {0}
    spent = sum(Decimal(str(cost)) for cost, status, _ in rows if status == 200)
    assert spent <= budget
    view = get_team(engine, "research")
    assert view.spent_usd == spent
    assert view.reserved_usd == 0


def test_free_paths_are_not_limited(
    engine: Engine, db_url: str, tmp_path: Path, sdks: list[anthropic.Anthropic]
) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal("0.0001"))) as stack:
        assert sdk(stack, sdks).messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES).input_tokens == 14
        assert httpx.get(f"{stack.url}/v1/models", headers={"x-api-key": stack.key}).status_code == 200
