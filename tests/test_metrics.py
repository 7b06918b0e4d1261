"""`/metrics`: Prometheus text that agrees with the ledger, bounded labels, scraping with and without a token."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from proxy.instruments import LabelPolicy, Metrics, endpoint_label
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import get_key
from proxy.ledger.teams import TeamSettings, get_team
from proxy.pricing.table import PriceTable
from proxy.types import Usage, UsageRecord
from tests.replicas import free_port
from tests.stack import Stack, running_stack
from tests.waiting import wait_until

TOKEN = "scrape-secret"
MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hello"}]
BATCH: list[Any] = [
    {"custom_id": "first", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
    {"custom_id": "bad-one", "params": {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": []}},
]
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, token: str | None = TOKEN) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(f"{url}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return answer.text


def parse(text: str) -> Samples:
    """Every sample by name; the official parser raises on text Prometheus would not accept."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for found, value in samples.get(name, []) if labels.items() <= found.items())


@contextlib.contextmanager
def busy_stack(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[tuple[Stack, list[dict[str, Any]]]]:
    """A budgeted team and key, and one call of every kind through the SDK; yields the stack and the ledger."""
    team = TeamSettings(budget_usd=Decimal(50), models=("claude-sonnet-4-6", "claude-sonnet-4-5"))
    with running_stack(engine, db_url, tmp_path, team=team, key_budget=Decimal(20), metrics_token=TOKEN) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=2) as sdk:
            sdk.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
            with sdk.messages.stream(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES) as stream:
                stream.until_done()
            # Retried by the SDK: two failed attempts, then a success, all flagged.
            sdk.messages.create(
                model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-fail-first": "2"}
            )
            with pytest.raises(anthropic.PermissionDeniedError):
                sdk.messages.create(model="claude-opus-4-6", max_tokens=10, messages=MESSAGES)
            with pytest.raises(anthropic.RateLimitError):
                sdk.with_options(max_retries=0).messages.create(
                    model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-status": "429"}
                )
            batch = sdk.messages.batches.create(requests=BATCH)
            sdk.messages.batches.retrieve(batch.id)
            # Read twice: the ledger keeps each result once, and so must the metrics.
            assert len(list(sdk.messages.batches.results(batch.id))) == 2
            assert len(list(sdk.messages.batches.results(batch.id))) == 2
        stack.idle()
        # Leases end a second after their last call: then the ledger's numbers stand still.
        wait_until(lambda: get_team(engine, "research").reserved_usd == 0, "the key's lease to end")
        yield stack, [record for _, record in iter_usage(engine)]


def test_metrics_agree_with_the_ledger(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with busy_stack(engine, db_url, tmp_path) as (stack, records):
        samples = parse(scrape(stack.url))
    # Seven Messages calls; a batch created, retrieved three times (the SDK looks up `results_url` before each
    # read), its results read twice, and its two results.
    assert len(records) == 15
    assert total(samples, "spendgate_calls_total") == len(records)
    by_outcome: dict[str, int] = defaultdict(int)
    for record in records:
        by_outcome[record["outcome"]] += 1
    for outcome, count in by_outcome.items():
        assert total(samples, "spendgate_calls_total", team="research", outcome=outcome) == count, outcome
    spent = sum(Decimal(r["cost_usd"]) for r in records if r["cost_usd"])
    assert total(samples, "spendgate_spend_usd_total", team="research") == pytest.approx(float(spent), rel=1e-12)
    for kind, column in [
        ("input", "input_tokens"),
        ("output", "output_tokens"),
        ("cache_write_5m", "cache_creation_5m_input_tokens"),
        ("cache_write_1h", "cache_creation_1h_input_tokens"),
        ("cache_read", "cache_read_input_tokens"),
    ]:
        assert total(samples, "spendgate_tokens_total", kind=kind) == sum(r[column] for r in records), kind
    retries = [r for r in records if r["is_retry"]]
    assert len(retries) >= 2  # the SDK's two retries, and repeats of the same request
    assert total(samples, "spendgate_retry_calls_total", team="research") == len(retries)
    retry_spend = sum(Decimal(r["cost_usd"]) for r in retries)
    assert total(samples, "spendgate_retry_spend_usd_total") == pytest.approx(float(retry_spend), rel=1e-12)
    assert total(samples, "spendgate_refusals_total", reason="model_not_allowed") == 1
    upstream_errors = [r for r in records if r["outcome"] == "upstream_error"]
    assert total(samples, "spendgate_upstream_errors_total") == len(upstream_errors)
    assert total(samples, "spendgate_upstream_errors_total", error_type="rate_limit_error", status="429") == 1
    # Live calls are timed; batch results (no timings of their own) are not.
    live = [r for r in records if r["custom_id"] is None]
    for histogram in ("request_duration", "upstream_duration", "overhead"):
        assert total(samples, f"spendgate_{histogram}_seconds_count") == len(live), histogram
    assert total(samples, "spendgate_overhead_seconds_count", streamed="true") == 1
    assert total(samples, "spendgate_overhead_seconds_count", endpoint="/v1/messages/batches/{id}/results") == 2
    # Six Messages calls went out (one JSON, one stream, three attempts, one 429) and one batch: seven holds.
    assert total(samples, "spendgate_budget_holds_total") == 7
    assert total(samples, "spendgate_ledger_write_batches_total") >= 1
    assert total(samples, "spendgate_ledger_write_errors_total") == 0

    team = get_team(engine, "research")
    key = get_key(engine, stack.key_id)
    labels = {"team": "research", "key": "", "period": "month"}
    assert total(samples, "spendgate_budget_limit_usd", **labels) == 50
    assert total(samples, "spendgate_budget_spent_usd", **labels) == pytest.approx(float(team.spent_usd), rel=1e-12)
    assert total(samples, "spendgate_budget_held_usd", **labels) == pytest.approx(float(team.reserved_usd), rel=1e-12)
    remaining = float(team.remaining_usd or 0)
    assert total(samples, "spendgate_budget_remaining_usd", **labels) == pytest.approx(remaining, rel=1e-12)
    assert 0 < total(samples, "spendgate_budget_period_elapsed_ratio", **labels) <= 1
    key_labels = {"team": "research", "key": key.id, "period": "month"}
    assert total(samples, "spendgate_budget_limit_usd", **key_labels) == 20
    assert total(samples, "spendgate_budget_spent_usd", **key_labels) == pytest.approx(float(spent), rel=1e-12)


def test_every_answer_says_what_spendgate_added(stack: Stack) -> None:
    message = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": MESSAGES}
    headers = {"x-api-key": stack.key}
    answers = [
        httpx.post(f"{stack.url}/v1/messages", json=message, headers=headers),
        httpx.post(f"{stack.url}/v1/messages", json={**message, "stream": True}, headers=headers),
        httpx.post(f"{stack.url}/v1/messages", json=message, headers={"x-api-key": "wrong"}),
        httpx.post(f"{stack.url}/v1/messages/count_tokens", json=message, headers=headers),
        httpx.options(f"{stack.url}/v1/messages"),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 401, 200, 204]
    for answer in answers:
        added = float(answer.headers["x-spendgate-overhead-ms"])
        # Below the whole call's time, which includes it (a loopback call takes well under a minute).
        assert 0 <= added < 60_000, answer.request.url


def test_scraping_wants_a_token_on_the_proxy_port(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, metrics_token=TOKEN, admin_token="admin-secret") as stack:
        assert httpx.get(f"{stack.url}/metrics").status_code == 401
        assert httpx.get(f"{stack.url}/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{stack.url}/metrics", headers={"authorization": "Basic " + TOKEN}).status_code == 401
        scrape(stack.url, TOKEN)
        scrape(stack.url, "admin-secret")
        answer = httpx.get(f"{stack.url}/metrics")
        assert answer.json()["error"]["type"] == "authentication_error"


def test_scraping_is_off_the_proxy_port_without_a_token(stack: Stack) -> None:
    answer = httpx.get(f"{stack.url}/metrics")
    assert answer.status_code == 404
    assert "SPENDGATE_METRICS_ADDR" in answer.json()["error"]["message"]


def test_a_separate_metrics_address_needs_no_token(engine: Engine, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    with running_stack(engine, db_url, tmp_path, metrics_addr=("127.0.0.1", port)) as stack:
        httpx.post(
            f"{stack.url}/v1/messages",
            json={"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": MESSAGES},
            headers={"x-api-key": stack.key},
        )
        stack.idle()
        samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        assert total(samples, "spendgate_calls_total", outcome="ok") == 1
        assert total(samples, "spendgate_budget_spent_usd", team="research") > 0
    # Closed with the proxy.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


PRICES = PriceTable.load()
TEAMS = ("research", "ops")
hostile = st.text(max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.one_of(
        hostile,
        st.sampled_from(["claude-sonnet-4-6", "claude-opus-4-6"]),
        st.integers(10_000_000, 99_999_999).map(lambda n: f"claude-sonnet-4-6-{n}"),
    ),
    response_model=st.one_of(st.none(), st.just("claude-sonnet-4-6-20260101")),
    endpoint=st.one_of(
        hostile.map(lambda s: "/v1/" + s),
        st.sampled_from(["/v1/messages", "/v1/messages/batches", "/v1/messages/count_tokens"]),
        hostile.map(lambda s: "/v1/messages/batches/" + s),
    ),
    feature=st.one_of(st.none(), hostile, st.just("search")),
    user=st.one_of(st.none(), hostile, st.just("alice")),
    team=st.one_of(st.none(), st.sampled_from(TEAMS)),
    error_type=st.one_of(st.none(), st.sampled_from(["budget_exceeded", "overloaded_error"])),
)
def test_labels_stay_bounded_whatever_clients_send(
    model: str,
    response_model: str | None,
    endpoint: str,
    feature: str | None,
    user: str | None,
    team: str | None,
    error_type: str | None,
) -> None:
    metrics = Metrics(LabelPolicy(lists_model=PRICES.lists, features={"search"}, users={"alice"}))
    now = datetime.now(UTC)
    for outcome in ("ok", "rejected", "upstream_error", "client_disconnected"):
        metrics.recorded(
            UsageRecord(
                id="sgr_x",
                started_at=now,
                finished_at=now,
                team=team,
                key_id=None,
                feature=feature,
                user=user,
                endpoint=endpoint,
                model=model,
                response_model=response_model,
                upstream_request_id=None,
                status=500,
                outcome=outcome,
                error_type=error_type,
                streamed=False,
                usage=Usage(input_tokens=3),
                cost_usd=Decimal("0.1"),
                price_version="v",
                price_source="family",
                latency_ms=1.0,
                ttfb_ms=None,
                upstream_ms=0.5,
            )
        )
    allowed = {
        "team": {*TEAMS, "none"},
        "model": {"claude-sonnet-4-6", "claude-opus-4-6", "claude-sonnet-4-6-20260101", "other", "none"},
        "endpoint": {
            "/v1/messages",
            "/v1/messages/batches",
            "/v1/messages/count_tokens",
            "/v1/messages/batches/{id}",
            "/v1/messages/batches/{id}/results",
            "/v1/messages/batches/{id}/cancel",
            "other",
        },
        "feature": {"search", "other"},
        "user": {"alice", "other"},
    }
    for family in metrics.registry.collect():
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name in allowed:
                    assert value in allowed[name], (family.name, name, value)


def test_endpoint_labels() -> None:
    assert endpoint_label("/v1/messages") == "/v1/messages"
    assert endpoint_label("/v1/messages/batches/msgbatch_1/results") == "/v1/messages/batches/{id}/results"
    assert endpoint_label("/v1/messages/batches/msgbatch_1") == "/v1/messages/batches/{id}"
    assert endpoint_label("/v1/models/claude") == "other"
