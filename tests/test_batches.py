"""Message Batches through the proxy with the official SDK: owned, budgeted, metered at 50%, never bypassed."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from sqlalchemy import Engine
from starlette.types import Receive, Scope, Send

from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team, get_team
from tests.servers import serve_in_thread
from tests.stack import Stack, running_stack, running_stack_again
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

REQUESTS: list[Any] = [
    {"custom_id": "first", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
    {"custom_id": "second", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
    {"custom_id": "bad-one", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
    {"custom_id": "too-late", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
]
# Sonnet 4.6 at batch rates, per MTok: 10 in × $1.50 + 2,000 5m-writes × $1.875 + 34 out × $7.50.
SUCCEEDED_COST = "0.00402"


def client(stack: Stack, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key or stack.key, max_retries=0)


def result_records(stack: Stack) -> list[dict[str, Any]]:
    return [r for _, r in iter_usage(stack.engine) if r["custom_id"] is not None]


def batch_records(stack: Stack, count: int) -> list[dict[str, Any]]:
    """Wait until `count` batch results are recorded; returns them (each call's own record is left out)."""
    wait_until(lambda: len(result_records(stack)) >= count, f"{count} result records")
    return result_records(stack)


def test_lifecycle_is_metered_at_batch_rates(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(budget_usd=Decimal(5))
    with running_stack(engine, db_url, tmp_path, team=team) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS)
        assert created.results_url is None
        ended = sdk.messages.batches.retrieve(created.id)
        # The absolute URL the API returns would bypass the proxy: it now points at the proxy.
        assert ended.results_url == f"{stack.url}/v1/messages/batches/{created.id}/results"
        results = {item.custom_id: item.result.type for item in sdk.messages.batches.results(created.id)}
        assert results == {"first": "succeeded", "second": "succeeded", "bad-one": "errored", "too-late": "expired"}
        records = batch_records(stack, 4)
        # Reading again records nothing new.
        assert len(list(sdk.messages.batches.results(created.id))) == 4
        stack.idle()
        assert len(result_records(stack)) == 4
        assert stack.upstream.requests[-1].path.endswith("/results")
    by_id = {r["custom_id"]: r for r in records}
    assert {r["batch_id"] for r in records} == {created.id}
    assert by_id["first"]["cost_usd"] == SUCCEEDED_COST
    assert by_id["first"]["service_tier"] == "batch"
    assert (by_id["first"]["input_tokens"], by_id["first"]["cache_creation_5m_input_tokens"]) == (10, 2000)
    assert (by_id["bad-one"]["outcome"], by_id["bad-one"]["error_type"], by_id["bad-one"]["cost_usd"]) == (
        "upstream_error",
        "invalid_request_error",
        "0",
    )
    assert (by_id["too-late"]["error_type"], by_id["too-late"]["cost_usd"]) == ("expired", "0")
    assert {r["team"] for r in records} == {"research"}
    view = get_team(engine, "research")
    # Both successes are spent; the batch's hold was released with its last result.
    assert view.spent_usd == Decimal(SUCCEEDED_COST) * 2
    assert view.reserved_usd == 0


def test_other_teams_cannot_see_a_batch(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS[:1])
        create_team(engine, "other", TeamSettings(), actor="test")
        _, other_key = create_key(engine, "other", actor="test")
        with client(stack, other_key) as other:
            for attempt in (
                lambda: other.messages.batches.retrieve(created.id),
                lambda: other.messages.batches.cancel(created.id),
                lambda: other.messages.batches.delete(created.id),
                lambda: list(other.messages.batches.results(created.id)),
            ):
                with pytest.raises(anthropic.NotFoundError, match="Batches are visible only to the team"):
                    attempt()
            assert [batch.id for batch in other.messages.batches.list()] == []
        listed = list(sdk.messages.batches.list())
        assert [batch.id for batch in listed] == [created.id]
        assert sdk.messages.batches.cancel(created.id).processing_status == "canceling"
        assert sdk.messages.batches.delete(created.id).type == "message_batch_deleted"


def test_batch_too_big_for_the_budget_is_refused_whole(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(budget_usd=Decimal("0.001"))
    with running_stack(engine, db_url, tmp_path, team=team) as stack, client(stack) as sdk:
        with pytest.raises(anthropic.APIStatusError) as refused:
            sdk.messages.batches.create(requests=REQUESTS)
        assert refused.value.status_code == 402
        assert stack.upstream.requests == []
        [record] = stack.records(1)
    assert (record["endpoint"], record["error_type"]) == ("/v1/messages/batches", "budget_exceeded")


def test_result_records_carry_the_create_calls_tags(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path) as stack, client(stack) as sdk:
        tags = {
            "x-spendgate-feature": "nightly-eval",
            "x-spendgate-user": "ann",
            "x-spendgate-session": "eval-run-3",
            "x-claude-code-agent-id": "agent-2",
            "x-claude-code-parent-agent-id": "agent-1",
        }
        created = sdk.messages.batches.create(requests=REQUESTS[:2], extra_headers=tags)
        sdk.messages.batches.retrieve(created.id)
        list(sdk.messages.batches.results(created.id))
        records = batch_records(stack, 2)
    assert {(r["feature"], r["user"], r["session"], r["agent"], r["parent_agent"]) for r in records} == {
        ("nightly-eval", "ann", "eval-run-3", "agent-2", "agent-1")
    }


def test_reconciler_records_a_batch_nobody_downloaded(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, batch_reconcile_seconds=0.2) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS[:2])
        records = batch_records(stack, 2)
    assert sorted(r["custom_id"] for r in records) == ["first", "second"]
    assert {r["cost_usd"] for r in records} == {SUCCEEDED_COST}
    assert {r["batch_id"] for r in records} == {created.id}


def test_deleting_unread_results_meters_them_first(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS[:2])
        sdk.messages.batches.retrieve(created.id)
        sdk.messages.batches.delete(created.id)
        records = batch_records(stack, 2)
    assert sorted(r["custom_id"] for r in records) == ["first", "second"]


def test_a_batch_gone_upstream_releases_its_hold(engine: Engine, db_url: str, tmp_path: Path) -> None:
    team = TeamSettings(budget_usd=Decimal(5))
    with running_stack(engine, db_url, tmp_path, team=team) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS[:1])
        assert get_team(engine, "research").reserved_usd > 0
        del stack.upstream.batches[created.id]
    with running_stack_again(engine, db_url, tmp_path, stack, batch_reconcile_seconds=0.2):
        wait_until(lambda: get_team(engine, "research").reserved_usd == 0, "the vanished batch's hold to be released")


def test_a_batch_not_ended_is_looked_at_again(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=REQUESTS[:1])
        stack.upstream.batches[created.id]["status"] = "in_progress"
        stack.upstream.hold_batches = True
    with running_stack_again(engine, db_url, tmp_path, stack, batch_reconcile_seconds=0.2):
        # The first passes find it in progress; their claims must not keep the next passes away.
        wait_until(lambda: stack.upstream.retrieves.get(created.id, 0) >= 3, "three looks at the batch")
        stack.upstream.hold_batches = False
        batch_records(stack, 1)


def test_a_result_without_service_tier_is_priced_at_batch_rates(engine: Engine, db_url: str, tmp_path: Path) -> None:
    requests = [{**REQUESTS[0], "custom_id": "untiered-one"}, REQUESTS[1]]
    with running_stack(engine, db_url, tmp_path) as stack, client(stack) as sdk:
        created = sdk.messages.batches.create(requests=requests)
        sdk.messages.batches.retrieve(created.id)
        assert len(list(sdk.messages.batches.results(created.id))) == 2
        records = {r["custom_id"]: r for r in batch_records(stack, 2)}
    assert records["untiered-one"]["cost_usd"] == records["second"]["cost_usd"] == SUCCEEDED_COST
    assert records["untiered-one"]["service_tier"] == "batch"


class BatchCreatesInFlight:
    """The fake upstream, counting the batch creates it is answering at once."""

    def __init__(self, app: FakeAnthropic) -> None:
        self.app = app
        self.now = self.most = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/batches")
        self.now += counted
        self.most = max(self.most, self.now)
        try:
            await self.app(scope, receive, send)
        finally:
            self.now -= counted


def large_batch(custom_id: str) -> bytes:
    params = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 60_000}]}
    return json.dumps({"requests": [{"custom_id": custom_id, "params": params}]}).encode()


def test_large_batch_bodies_are_taken_in_one_at_a_time(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Four 256 MB batch creates at once took 2.66 GB: a body over the ordinary limit (50 KB here) waits for the
    one turn such bodies have and keeps it until its call is done; one whose turn does not come while its body
    may arrive gets 529 `overloaded_error`, and the process keeps serving meanwhile."""
    upstream = BatchCreatesInFlight(FakeAnthropic())
    with serve_in_thread(upstream) as upstream_url:
        with running_stack(engine, db_url, tmp_path, upstream_url=upstream_url, max_body_bytes=50_000) as stack:
            headers = {"x-api-key": stack.key, "content-type": "application/json", "x-fake-hang": "0.3"}
            answers: list[int] = []

            def create(n: int) -> None:
                url = f"{stack.url}/v1/messages/batches"
                answers.append(httpx.post(url, content=large_batch(str(n)), headers=headers, timeout=60).status_code)

            threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert answers == [200] * 4
            assert upstream.most == 1


def test_a_large_body_whose_turn_does_not_come_is_overloaded(engine: Engine, db_url: str, tmp_path: Path) -> None:
    upstream = BatchCreatesInFlight(FakeAnthropic())
    with serve_in_thread(upstream) as upstream_url:
        settings: dict[str, Any] = {"max_body_bytes": 50_000, "body_timeout_seconds": 1.0}
        with running_stack(engine, db_url, tmp_path, upstream_url=upstream_url, **settings) as stack:
            url = f"{stack.url}/v1/messages/batches"
            headers = {"x-api-key": stack.key, "content-type": "application/json"}
            first = threading.Thread(
                target=lambda: httpx.post(url, content=large_batch("a"), headers={**headers, "x-fake-hang": "3"})
            )
            first.start()
            wait_until(lambda: upstream.now == 1, "the first large batch to reach the upstream")
            second = httpx.post(url, content=large_batch("b"), headers=headers, timeout=30)
            # Everything else is served meanwhile.
            message = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
            answer = httpx.post(f"{stack.url}/v1/messages", json=message, headers=headers, timeout=30)
            first.join(timeout=30)
    assert second.status_code == 529
    assert second.json()["error"]["type"] == "overloaded_error"
    assert second.headers["x-spendgate-error"] == "large_body_busy"
    assert answer.status_code == 200
