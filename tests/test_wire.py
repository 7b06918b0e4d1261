"""End to end on the wire: the official SDK → spendgate under uvicorn → a fake Anthropic under uvicorn."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from sqlalchemy import Engine

from proxy.ledger.teams import TeamSettings, get_team
from tests.stack import Stack, running_stack
from tests.upstream import MODELS, UPSTREAM_KEY, fixture

MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hello"}]


_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def client(stack: Stack, **kwargs: object) -> anthropic.Anthropic:
    """An SDK client pointed at the proxy with the stack's key; closed after the test."""
    sdk = anthropic.Anthropic(base_url=stack.url, api_key=stack.key, **kwargs)  # type: ignore[arg-type]
    _clients.append(sdk)
    return sdk


def test_plain_call_passes_through_and_is_priced(stack: Stack) -> None:
    raw = client(stack).messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES)
    message = raw.parse()
    assert message.model == "claude-sonnet-4-5-20250929"
    assert message.usage.input_tokens == 406
    assert raw.http_response.content == fixture("message.json")
    # Sonnet 4.5 at $3/$15 per MTok: 406 in + 50 out.
    assert raw.headers["x-spendgate-cost-usd"] == "0.001968"
    assert raw.headers["request-id"] == "req_fake_0001"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    [record] = stack.records(1)
    assert record["id"] == raw.headers["x-spendgate-request-id"]
    assert record["team"] == "research"
    assert record["key_id"] == stack.key_id
    assert record["model"] == "claude-sonnet-4-5"
    assert record["response_model"] == "claude-sonnet-4-5-20250929"
    assert record["upstream_request_id"] == "req_fake_0001"
    assert (record["status"], record["outcome"], record["streamed"]) == (200, "ok", False)
    assert (record["input_tokens"], record["output_tokens"]) == (406, 50)
    assert record["service_tier"] == "standard"
    assert record["inference_geo"] == "not_available"
    assert record["cost_usd"] == "0.001968"
    assert record["max_tokens_requested"] == 100
    assert record["is_retry"] is False
    assert record["latency_ms"] > 0


def test_upstream_sees_its_key_and_the_client_headers(stack: Stack) -> None:
    sdk = client(stack)
    sdk.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=10,
        messages=MESSAGES,
        extra_headers={"anthropic-beta": "fast-mode-2026-02-01", "x-spendgate-feature": "search"},
    )
    seen = stack.upstream.requests[-1]
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in seen.headers
    assert stack.key not in json.dumps(seen.headers)
    assert seen.headers["anthropic-version"] == sdk.default_headers["anthropic-version"]
    assert seen.headers["anthropic-beta"] == "fast-mode-2026-02-01"
    assert seen.headers["x-stainless-retry-count"] == "0"
    assert "x-spendgate-feature" not in seen.headers
    assert json.loads(seen.body)["max_tokens"] == 10
    [record] = stack.records(1)
    assert record["feature"] == "search"


def test_bearer_auth_and_beta_query(stack: Stack) -> None:
    sdk = anthropic.Anthropic(base_url=stack.url, auth_token=stack.key)
    _clients.append(sdk)
    sdk.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_query={"beta": "true"})
    assert stack.upstream.requests[-1].query == "beta=true"
    [record] = stack.records(1)
    assert record["endpoint"] == "/v1/messages"
    assert record["key_id"] == stack.key_id


def test_stream_is_metered_from_both_events(stack: Stack) -> None:
    with client(stack).messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "[12345,67890]"
    assert final.usage.output_tokens == 10
    [record] = stack.records(1)
    assert record["streamed"] is True
    assert (record["input_tokens"], record["output_tokens"]) == (135, 10)
    assert record["response_model"] == "claude-sonnet-4-5-20250929"
    # 135 × $3 + 10 × $15 per MTok.
    assert record["cost_usd"] == "0.000555"
    assert record["ttfb_ms"] is not None


def test_stream_bytes_are_identical(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as http:
        response = http.post(
            "/v1/messages",
            headers={"x-api-key": stack.key, "x-fake-chunk": "7"},
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MESSAGES, "stream": True},
        )
    assert response.content == fixture("stream-text.sse")
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"


def test_web_search_stream_takes_final_input(stack: Stack) -> None:
    with client(stack).messages.stream(
        model="claude-opus-5", max_tokens=1000, messages=MESSAGES, extra_headers={"x-fake-stream": "web-search"}
    ) as stream:
        stream.until_done()
    [record] = stack.records(1)
    assert (record["input_tokens"], record["output_tokens"], record["web_search_requests"]) == (10682, 510, 1)
    # Opus 5 at $5/$25: 10,682 × 5 + 510 × 25 per MTok, plus one search at $0.01.
    assert record["cost_usd"] == "0.07616"


def test_error_midway_keeps_input_billed(stack: Stack) -> None:
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        client(stack).messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=100,
            messages=MESSAGES,
            extra_headers={"x-fake-stream": "error-midway"},
        ) as stream,
    ):
        stream.until_done()
    [record] = stack.records(1)
    assert (record["outcome"], record["error_type"], record["status"]) == ("upstream_error", "overloaded_error", 200)
    assert record["input_tokens"] == 1200
    # 1,200 × $3 + 1 × $15 per MTok: the input was consumed even though the answer failed.
    assert record["cost_usd"] == "0.003615"


@pytest.mark.anyio
async def test_async_client_create_and_stream(stack: Stack) -> None:
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=stack.key) as sdk:
        message = await sdk.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        async with sdk.messages.stream(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert message.usage.output_tokens == 50
    assert final.usage.output_tokens == 10
    records = stack.records(2)
    assert [r["streamed"] for r in records] == [False, True]


def test_upstream_error_passes_through_and_sdk_retries_are_flagged(stack: Stack) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        client(stack, max_retries=2).messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-status": "429"}
        )
    assert caught.value.body == json.loads(fixture("error-429.json"))
    assert caught.value.response.headers["x-should-retry"] == "true"
    records = stack.records(3)
    assert [r["status"] for r in records] == [429, 429, 429]
    assert {r["outcome"] for r in records} == {"upstream_error"}
    assert {r["error_type"] for r in records} == {"rate_limit_error"}
    assert [r["is_retry"] for r in records] == [False, True, True]
    assert [r["retry_reason"] for r in records] == [None, "sdk", "sdk"]
    assert {r["cost_usd"] for r in records} == {"0"}


def test_nonstandard_413_body_passes_through(stack: Stack) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(stack, max_retries=0).messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-status": "413"}
        )
    assert caught.value.status_code == 413
    [record] = stack.records(1)
    assert (record["status"], record["error_type"]) == (413, "request_too_large")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"x-api-key": "sk-sg-not-a-key"}, id="unknown"),
        pytest.param({"authorization": "Basic abc"}, id="wrong-scheme"),
    ],
)
def test_bad_key_is_refused_in_anthropic_shape(stack: Stack, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=stack.url) as http:
        response = http.post("/v1/messages", headers=headers, json={"model": "claude-sonnet-4-6", "max_tokens": 1})
    assert response.status_code == 401
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["x-spendgate-error"] == "invalid_key"
    assert response.headers["x-should-retry"] == "false"
    assert stack.upstream.requests == []
    [record] = stack.records(1)
    assert (record["status"], record["outcome"], record["error_type"]) == (401, "rejected", "invalid_key")


def test_sdk_raises_authentication_error_without_retrying(stack: Stack) -> None:
    sdk = anthropic.Anthropic(base_url=stack.url, api_key="sk-sg-wrong")
    _clients.append(sdk)
    with pytest.raises(anthropic.AuthenticationError):
        sdk.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
    assert len(stack.records(1)) == 1


@pytest.mark.parametrize(
    "body",
    [pytest.param(b"{not json", id="not-json"), pytest.param(b"[1, 2]", id="not-an-object")],
)
def test_bad_body_is_refused_before_upstream(stack: Stack, body: bytes) -> None:
    with httpx.Client(base_url=stack.url) as http:
        response = http.post("/v1/messages", headers={"x-api-key": stack.key}, content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["x-spendgate-error"] == "bad_request"
    assert stack.upstream.requests == []
    [record] = stack.records(1)
    assert record["outcome"] == "rejected"


def test_count_tokens_is_recorded_free(stack: Stack) -> None:
    count = client(stack).messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)
    assert count.input_tokens == 14
    [record] = stack.records(1)
    assert record["endpoint"] == "/v1/messages/count_tokens"
    assert record["cost_usd"] == "0"


def test_other_paths_are_forwarded_and_recorded_unmetered(stack: Stack) -> None:
    models = client(stack).models.list()
    assert [m.id for m in models.data] == [model["id"] for model in MODELS]
    client(stack).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
    listed, created = stack.records(2)
    assert (listed["endpoint"], listed["cost_usd"], listed["price_source"]) == ("/v1/models", None, "unmetered")
    assert (listed["team"], listed["outcome"], listed["status"]) == ("research", "ok", 200)
    assert (created["endpoint"], created["price_source"]) == ("/v1/messages", "table")


def test_metadata_user_is_recorded(stack: Stack) -> None:
    client(stack).messages.create(
        model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, metadata={"user_id": "u-42"}
    )
    client(stack).messages.create(
        model="claude-sonnet-4-6",
        max_tokens=10,
        messages=MESSAGES,
        metadata={"user_id": "u-42"},
        extra_headers={"x-spendgate-user": "alice"},
    )
    assert [r["user"] for r in stack.records(2)] == ["u-42", "alice"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_upstream_is_502(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, upstream_url=f"http://127.0.0.1:{_closed_port()}") as stack:
        with pytest.raises(anthropic.InternalServerError) as caught:
            client(stack, max_retries=0).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        assert caught.value.status_code == 502
        assert caught.value.response.headers["x-spendgate-error"] == "upstream_unreachable"
        [record] = stack.records(1)
    assert (record["outcome"], record["error_type"], record["status"]) == (
        "upstream_unreachable",
        "upstream_unreachable",
        502,
    )


def test_upstream_timeout_is_504(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, upstream_read_timeout=0.2) as stack:
        with pytest.raises(anthropic.InternalServerError) as caught:
            client(stack, max_retries=0).messages.create(
                model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES, extra_headers={"x-fake-hang": "2"}
            )
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-spendgate-error"] == "upstream_timeout"
        [record] = stack.records(1)
    assert (record["outcome"], record["error_type"]) == ("upstream_unreachable", "upstream_timeout")


def test_body_over_limit_is_413(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, max_body_bytes=1000) as stack:
        with pytest.raises(anthropic.APIStatusError) as caught:
            client(stack, max_retries=0).messages.create(
                model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "x" * 2000}]
            )
        assert caught.value.status_code == 413
        assert stack.upstream.requests == []
        [record] = stack.records(1)
    assert record["error_type"] == "request_too_large"


def test_client_disconnect_mid_stream_bills_input(stack: Stack) -> None:
    with (
        httpx.Client(base_url=stack.url) as http,
        http.stream(
            "POST",
            "/v1/messages",
            headers={"x-api-key": stack.key, "x-fake-chunk": "700", "x-fake-delay": "0.2"},
            json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": MESSAGES, "stream": True},
        ) as response,
    ):
        first = next(response.iter_raw())
        assert first.startswith(b"event: message_start")
    [record] = stack.records(1)
    assert record["outcome"] == "client_disconnected"
    assert record["input_tokens"] == 135
    # Input seen in message_start is billed: 135 × $3 + 1 × $15 per MTok.
    assert record["cost_usd"] == "0.00042"


@pytest.mark.parametrize("budget", [None, Decimal(50)], ids=["no-budget", "budget"])
def test_a_stream_cut_before_its_usage_is_charged_its_worst_case(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal | None
) -> None:
    """The call reached the upstream, which may bill it, but the client left before any usage came back (the
    answer had started: one byte of it): its record and its budget carry the worst case, flagged
    `cost_source: estimate` (such streams were recorded at $0, charged to nothing)."""
    messages = [{"role": "user", "content": "x" * 100_000}]
    body = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 1000, "messages": messages, "stream": True})
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=budget)) as stack:
        port = int(stack.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            head = (
                f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {stack.key}\r\n"
                "x-fake-chunk: 1\r\nx-fake-delay: 5\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            raw.sendall(head.encode() + body.encode())
            assert raw.recv(12) == b"HTTP/1.1 200"
        [record] = stack.records(1)
    team = get_team(engine, "research")
    assert (record["outcome"], record["cost_source"]) == ("client_disconnected", "estimate")
    # Every byte of the body at the 5-minute cache-write rate ($3.75/MTok), 1,000 output tokens at $15/MTok.
    assert Decimal(record["cost_usd"]) == (len(body) * Decimal("3.75") + 1000 * 15) / 10**6
    assert team.spent_usd == Decimal(record["cost_usd"])
    assert team.reserved_usd == 0


def test_revoked_key_is_refused(engine: Engine, db_url: str, tmp_path: Path) -> None:
    from proxy.ledger.key_admin import revoke_key

    with running_stack(engine, db_url, tmp_path, key_cache_seconds=0) as stack:
        client(stack).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        revoke_key(engine, stack.key_id, actor="test")
        with pytest.raises(anthropic.AuthenticationError):
            client(stack).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
        records = stack.records(2)
    assert [r["outcome"] for r in records] == ["ok", "rejected"]
