"""Forwarding at unit level: the proxy app in-process with `httpx.MockTransport` / respx as its upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import respx
from sqlalchemy import Engine
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.errors import (
    BadRequest,
    BatchNotFound,
    BodyTimeout,
    BudgetExceeded,
    InvalidKey,
    LedgerUnavailable,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    NonCanonicalPath,
    OutputCapExceeded,
    Overloaded,
    ProxyError,
    RateLimited,
    RequestTooLarge,
    RouteNotFound,
    UnpricedModel,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from tests.stack import settings_for
from tests.upstream import UPSTREAM_KEY, fixture

UPSTREAM = "https://upstream.test"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def key(engine: Engine) -> str:
    create_team(engine, "research", TeamSettings(), actor="test")
    return create_key(engine, "research", actor="test")[1]


@pytest.fixture
def make_client(db_url: str, tmp_path: Path) -> Iterator[Callable[[httpx.AsyncBaseTransport], TestClient]]:
    clients: list[TestClient] = []

    def make(transport: httpx.AsyncBaseTransport) -> TestClient:
        app = create_app(settings_for(db_url, UPSTREAM, tmp_path), transport=transport)
        client = TestClient(app).__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def body(stream: bool = False) -> dict[str, object]:
    return {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "stream": stream}


def test_hop_by_hop_headers_are_dropped_both_ways(make_client: Callable[..., TestClient], key: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            content=fixture("message.json"),
            headers={
                "content-type": "application/json",
                "keep-alive": "timeout=5",
                "connection": "x-hop",
                "x-hop": "for this connection only",
                "x-custom": "kept",
            },
        )

    client = make_client(httpx.MockTransport(handler))
    response = client.post(
        "/v1/messages",
        json=body(),
        headers={
            "x-api-key": key,
            "connection": "keep-alive, x-private",
            "x-private": "only for this hop",
            "proxy-authorization": "Basic abc",
            "te": "trailers",
            "anthropic-beta": "a,b",
            "accept-encoding": "gzip, br",
        },
    )
    assert response.status_code == 200
    sent = seen[0].headers
    for dropped in ("connection", "x-private", "proxy-authorization", "te", "authorization"):
        assert dropped not in sent
    assert sent["x-api-key"] == UPSTREAM_KEY
    assert sent["anthropic-beta"] == "a,b"
    # The usage tap reads the body, so a metered call asks for it uncompressed.
    assert sent["accept-encoding"] == "identity"
    assert str(seen[0].url) == f"{UPSTREAM}/v1/messages"
    assert "keep-alive" not in response.headers
    assert "x-hop" not in response.headers
    assert response.headers["x-custom"] == "kept"
    assert response.content == fixture("message.json")


def test_unmetered_paths_keep_client_encoding(make_client: Callable[..., TestClient], key: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": []})

    client = make_client(httpx.MockTransport(handler))
    response = client.get("/v1/models?limit=5", headers={"x-api-key": key, "accept-encoding": "gzip"})
    assert response.status_code == 200
    assert seen[0].headers["accept-encoding"] == "gzip"
    assert seen[0].url.query == b"limit=5"
    assert seen[0].method == "GET"
    # Unmetered, but recorded all the same: nothing passes invisibly.
    assert response.headers["x-spendgate-request-id"].startswith("sgr_")


@pytest.mark.parametrize(
    "exception, status, reason",
    [
        pytest.param(httpx.ConnectError("refused"), 502, "upstream_unreachable", id="connect-error"),
        pytest.param(httpx.RemoteProtocolError("bad"), 502, "upstream_unreachable", id="protocol-error"),
        pytest.param(httpx.ReadError("reset"), 502, "upstream_unreachable", id="read-error"),
        pytest.param(httpx.ConnectTimeout("slow"), 504, "upstream_timeout", id="connect-timeout"),
        pytest.param(httpx.ReadTimeout("slow"), 504, "upstream_timeout", id="read-timeout"),
        pytest.param(httpx.PoolTimeout("busy"), 504, "upstream_timeout", id="pool-timeout"),
    ],
)
def test_transport_errors_map_to_502_and_504(
    make_client: Callable[..., TestClient], key: str, exception: Exception, status: int, reason: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    response = make_client(httpx.MockTransport(handler)).post("/v1/messages", json=body(), headers={"x-api-key": key})
    assert response.status_code == status
    assert response.headers["x-spendgate-error"] == reason
    assert response.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": response.json()["error"]["message"]},
    }
    assert "x-should-retry" not in response.headers


def test_respx_upstream_sees_one_call(make_client: Callable[..., TestClient], key: str) -> None:
    with respx.mock(base_url=UPSTREAM, assert_all_called=True) as upstream:
        route = upstream.post("/v1/messages/count_tokens").respond(200, content=fixture("count-tokens.json"))
        response = make_client(httpx.AsyncHTTPTransport()).post(
            "/v1/messages/count_tokens", json={"model": "claude-sonnet-4-6", "messages": []}, headers={"x-api-key": key}
        )
    assert response.json() == {"input_tokens": 14}
    assert route.call_count == 1
    assert "x-spendgate-cost-usd" not in response.headers


def test_stream_is_relayed_chunk_for_chunk(make_client: Callable[..., TestClient], key: str) -> None:
    sse = fixture("stream-text.sse")

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for start in range(0, len(sse), 3):
                yield sse[start : start + 3]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Chunks())

    response = make_client(httpx.MockTransport(handler)).post(
        "/v1/messages", json=body(stream=True), headers={"x-api-key": key}
    )
    assert response.content == sse
    assert "x-spendgate-request-id" in response.headers
    assert "x-spendgate-cost-usd" not in response.headers


ERROR_TABLE = [
    pytest.param(InvalidKey, 401, "authentication_error", "invalid_key", True, id="invalid-key"),
    pytest.param(ModelNotAllowed, 403, "permission_error", "model_not_allowed", True, id="model-not-allowed"),
    pytest.param(ModelNotFound, 404, "not_found_error", "model_not_allowed", True, id="model-not-found"),
    pytest.param(OutputCapExceeded, 400, "invalid_request_error", "output_cap", True, id="output-cap"),
    pytest.param(BudgetExceeded, 402, "billing_error", "budget_exceeded", True, id="budget-exceeded"),
    pytest.param(BadRequest, 400, "invalid_request_error", "bad_request", True, id="bad-request"),
    pytest.param(RequestTooLarge, 413, "request_too_large", "request_too_large", True, id="too-large"),
    pytest.param(UnpricedModel, 400, "invalid_request_error", "unpriced_model", True, id="unpriced-model"),
    pytest.param(BatchNotFound, 404, "not_found_error", "batch_not_found", True, id="batch-not-found"),
    pytest.param(LedgerUnavailable, 503, "api_error", "ledger_unavailable", False, id="ledger-unavailable"),
    pytest.param(Overloaded, 529, "overloaded_error", "large_body_busy", False, id="large-body-busy"),
    pytest.param(UpstreamUnreachable, 502, "api_error", "upstream_unreachable", False, id="unreachable"),
    pytest.param(UpstreamTimeout, 504, "api_error", "upstream_timeout", False, id="timeout"),
    pytest.param(NonCanonicalPath, 400, "invalid_request_error", "non_canonical_path", True, id="non-canonical"),
    pytest.param(RouteNotFound, 404, "not_found_error", "not_found", True, id="no-route"),
    pytest.param(MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed", True, id="method"),
    pytest.param(BodyTimeout, 408, "timeout_error", "body_timeout", True, id="body-timeout"),
    # The SDKs retry a 429 after its retry-after; one too large for the limit ever says not to.
    pytest.param(RateLimited, 429, "rate_limit_error", "rate_limited", False, id="rate-limited"),
]


@pytest.mark.parametrize("error, status, error_type, reason, no_retry", ERROR_TABLE)
def test_error_table(error: type[ProxyError], status: int, error_type: str, reason: str, no_retry: bool) -> None:
    instance = error("what happened and what to do")
    headers = dict(instance.headers())
    assert (instance.status, instance.error_type, instance.reason) == (status, error_type, reason)
    assert json.loads(instance.body()) == {
        "type": "error",
        "error": {"type": error_type, "message": "what happened and what to do"},
    }
    assert headers[b"x-spendgate-error"] == reason.encode()
    assert (headers.get(b"x-should-retry") == b"false") is no_retry


def test_error_table_is_complete() -> None:
    covered = {param.values[0] for param in ERROR_TABLE}
    assert covered == set(ProxyError.__subclasses__())
