"""The request path tried as an attacker with a valid key would, against the real stack on loopback.

The proxy runs under uvicorn with its production upstream client (aiohttp), in front of a fake Anthropic that
captures the raw target of everything it receives: nothing may reach it unclassified or unchecked.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine

from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team, get_team
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.stack import Stack, running_stack
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

CANONICAL = re.compile(r"/v1(?:/[A-Za-z0-9_~-][A-Za-z0-9_.~-]*)+")
MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
ODD_MAX_TOKENS: list[Any] = [
    -1000000,
    -1,
    0,
    "4000",
    4000.5,
    None,
    True,
    False,
    [4000],
    {"n": 1},
    1e30,
    2**63,
    10**70,
    300_001,
]
ODD_MODELS: list[Any] = [None, "", 42, ["claude-sonnet-4-6"], "claude sonnet", "\ud800", "claude-\x00", "x" * 201]


def send(
    url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with the target sent byte for byte (httpx and the SDK would normalize it first)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {"content-length": str(len(body)), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def assert_anthropic_shaped(body: bytes) -> None:
    payload = json.loads(body)
    assert payload["type"] == "error"
    assert isinstance(payload["error"]["type"], str) and isinstance(payload["error"]["message"], str)


@pytest.fixture
def arena(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[tuple[Stack, str, str]]:
    """The stack with a victim's batch (team research) and an attacker's key on a budgeted team."""
    with running_stack(engine, db_url, tmp_path) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as victim:
            params: Any = MESSAGE
            batch = victim.messages.batches.create(requests=[{"custom_id": "a", "params": params}])
        create_team(engine, "attacker", TeamSettings(budget_usd=Decimal(50)), actor="test")
        _, key = create_key(engine, "attacker", actor="test")
        stack.idle()
        yield stack, key, batch.id


SEGMENTS = [
    "messages",
    "batches",
    "count_tokens",
    "models",
    "results",
    "cancel",
    "v1",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    "%6Dessages",
    "messages;x=1",
    "",
    "x",
    "%2f",
    "a.b",
    "~",
    "%00",
]
PREFIXES = ["/v1", "/v1", "/v1", "/%761", "/V1", "/v1/v1", "/admin", "/healthz", "", "//v1"]
QUERIES = ["", "", "?beta=true", "?a=%zz", "?a=1;b", "?x=%2e%2e"]
BODIES = st.one_of(
    st.builds(lambda v: {**MESSAGE, "max_tokens": v}, st.sampled_from(ODD_MAX_TOKENS) | st.integers()),
    st.builds(lambda v: {**MESSAGE, "model": v}, st.sampled_from(ODD_MODELS)),
    st.builds(lambda v: {**MESSAGE, "stream": v}, st.sampled_from([True, False, "yes", 1, None])),
    st.just(MESSAGE),
    st.just({"requests": [{"custom_id": "b", "params": MESSAGE}]}),
    st.just({"requests": [{"custom_id": "b", "params": {**MESSAGE, "max_tokens": -5}}]}),
    st.just({"model": "claude-sonnet-4-6", "messages": []}),
)


def test_nothing_reaches_the_upstream_unchecked(arena: tuple[Stack, str, str]) -> None:
    stack, key, foreign_batch = arena
    records_before = stack.count()
    answered: list[str] = []

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        method=st.sampled_from(["POST", "POST", "GET", "DELETE", "PUT", "PATCH", "HEAD", "TRACE", "OPTIONS"]),
        prefix=st.sampled_from(PREFIXES),
        segments=st.lists(st.sampled_from([*SEGMENTS, foreign_batch]), max_size=4),
        query=st.sampled_from(QUERIES),
        request=BODIES,
    )
    def attack(method: str, prefix: str, segments: list[str], query: str, request: dict[str, Any]) -> None:
        target = prefix + "".join("/" + segment for segment in segments) + query
        if not target.startswith("/"):
            target = "/" + target
        seen = len(stack.upstream.requests)
        body = json.dumps(request).encode()
        status, headers, answer = send(stack.url, method, target, body, {"x-api-key": key})
        reached = stack.upstream.requests[seen:]
        assert len(reached) <= 1
        if reached:
            upstream = reached[0]
            path, _, sent_query = target.partition("?")
            # Forwarded exactly as classified: the canonical path, byte for byte, never a normalized form of it.
            assert CANONICAL.fullmatch(upstream.raw_path), upstream.raw_path
            assert (upstream.method, upstream.raw_path, upstream.query) == (method, path, sent_query)
            # Another team's batch is never read, cancelled or deleted, however its path is spelled.
            assert not upstream.raw_path.startswith(f"/v1/messages/batches/{foreign_batch}")
            if upstream.raw_path in ("/v1/messages", "/v1/messages/count_tokens"):
                sent = json.loads(upstream.body)
                assert isinstance(sent["model"], str) and sent["model"].isprintable()
                if upstream.raw_path == "/v1/messages":
                    assert type(sent["max_tokens"]) is int and 1 <= sent["max_tokens"] <= 300_000
        if method != "HEAD" and ("x-spendgate-error" in headers or (status >= 400 and not reached)):
            assert_anthropic_shaped(answer)
        if method == "OPTIONS" and status == 204:
            assert not reached
            return
        if target.lower().startswith(("/v1", "/%")):
            # Everything the gateway answers has a record, and says which.
            answered.append(headers["x-spendgate-request-id"])

    attack()
    stack.idle()
    ids = [record["id"] for _, record in iter_usage(stack.engine)][records_before:]
    assert sorted(ids) == sorted(answered)
    team = get_team(stack.engine, "attacker")
    assert team.reserved_usd == 0
    assert team.spent_usd <= Decimal(50)


@pytest.mark.parametrize("budget", [None, Decimal("0.5")], ids=["no-budget", "budget"])
def test_odd_fields_never_go_out_and_never_leave_a_hold(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal | None
) -> None:
    team = TeamSettings(budget_usd=budget)
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        # A stream in flight holds part of the budget while the odd calls arrive.
        slow = {"x-api-key": stack.key, "x-fake-chunk": "100", "x-fake-delay": "0.05"}
        streaming = threading.Thread(
            target=httpx.post,
            args=(f"{stack.url}/v1/messages",),
            kwargs={"json": {**MESSAGE, "stream": True}, "headers": slow, "timeout": 60},
        )
        streaming.start()
        wait_until(lambda: stack.upstream.requests, "the stream to start")
        odd = [{**MESSAGE, "max_tokens": value} for value in ODD_MAX_TOKENS]
        odd += [{**MESSAGE, "model": value} for value in ODD_MODELS]
        odd += [{key: value for key, value in MESSAGE.items() if key != name} for name in ("model", "max_tokens")]
        for request in odd:
            status, headers, answer = send(
                stack.url, "POST", "/v1/messages", json.dumps(request).encode(), {"x-api-key": stack.key}
            )
            assert (status, headers["x-spendgate-error"]) == (400, "bad_request"), request
            assert_anthropic_shaped(answer)
        streaming.join(timeout=60)
        records = stack.records(len(odd) + 1)
        stack.idle()
        # Nothing is left held: no phantom hold, and the lease the stream took ends once unused.
        wait_until(lambda: get_team(engine, "research").reserved_usd == 0, "nothing held by this team")
        view = get_team(engine, "research")
    assert len(stack.upstream.requests) == 1
    assert [r["outcome"] for r in records].count("rejected") == len(odd)
    assert view.reserved_usd == 0
    if budget is not None:
        assert view.spent_usd <= budget


@pytest.mark.parametrize(
    "body, headers",
    [
        pytest.param(json.dumps(MESSAGE).encode(), {"x-stainless-retry-count": "9" * 5000}, id="retry-count-digits"),
        pytest.param(b'{"a":' * 500 + b"1" + b"}" * 500, {}, id="nested-500"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, {}, id="nested-100000"),
        pytest.param(json.dumps({**MESSAGE, "max_tokens": 10**70}).encode(), {}, id="max-tokens-1e70"),
        pytest.param(
            b'{"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "metadata": {"user_id": "\\ud800"}}',
            {"x-spendgate-feature": "caf\xe9"},
            id="lone-surrogate-user",
        ),
        pytest.param(b"\xff\xfe not json", {}, id="not-utf8"),
        pytest.param(
            json.dumps({**MESSAGE, "messages": [{"role": "user", "content": "\ud800" * 70_000}]}).encode(),
            {},
            id="big-body-with-surrogates",
        ),
    ],
)
def test_hostile_input_gets_an_answer_and_a_record(stack: Stack, body: bytes, headers: dict[str, str]) -> None:
    status, answer_headers, answer = send(stack.url, "POST", "/v1/messages", body, {"x-api-key": stack.key, **headers})
    assert status in (200, 400)
    if status == 400:
        assert_anthropic_shaped(answer)
    [record] = stack.records(1)
    assert record["id"] == answer_headers["x-spendgate-request-id"]


def test_identity_comes_before_the_body(stack: Stack) -> None:
    """A 250 MB batch create with a bad key is refused from its headers: the body is never waited for."""
    host, port = urlsplit(stack.url).hostname or "", urlsplit(stack.url).port or 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/messages/batches HTTP/1.1\r\nhost: x\r\nx-api-key: sk-sg-wrong\r\n"
            b"content-type: application/json\r\ncontent-length: 262144000\r\n\r\n{"
        )
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert_anthropic_shaped(body)


def test_a_trickling_body_times_out(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, body_timeout_seconds=0.5) as stack:
        host, port = urlsplit(stack.url).hostname or "", urlsplit(stack.url).port or 0
        with socket.create_connection((host, port), timeout=30) as sock:
            start = f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {stack.key}\r\ncontent-length: 100\r\n\r\n"
            sock.sendall(start.encode() + b"{")
            answer = sock.recv(65536)
        [record] = stack.records(1)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert_anthropic_shaped(body)
    assert (record["outcome"], record["error_type"]) == ("rejected", "body_timeout")


@pytest.mark.parametrize(
    "method, target, status, allow",
    [
        ("GET", "/v1/messages", 405, "POST"),
        ("GET", "/nothing-here", 404, None),
        ("POST", "/healthz", 405, "GET, HEAD"),
        ("GET", "/admin/teams/", 404, None),
        ("GET", "/v1", 404, None),
        ("POST", "/v1/v1/messages", 404, None),
    ],
)
def test_router_answers_are_anthropic_shaped(
    stack: Stack, method: str, target: str, status: int, allow: str | None
) -> None:
    got, headers, answer = send(stack.url, method, target, b"", {"x-api-key": stack.key})
    assert got == status
    assert set((headers.get("allow") or "").split(", ")) == set((allow or "").split(", "))
    assert_anthropic_shaped(answer)


def test_cors_preflight_is_answered_here(stack: Stack) -> None:
    status, headers, _ = send(
        stack.url,
        "OPTIONS",
        "/v1/messages",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key,anthropic-version",
        },
    )
    assert status == 204
    assert headers["access-control-allow-methods"] == "POST"
    assert headers["access-control-allow-headers"] == "x-api-key,anthropic-version"
    assert headers["access-control-allow-origin"] == "*"
    assert stack.upstream.requests == []


@pytest.mark.any_dialect
def test_a_giant_header_is_cut_off_without_stalling_others(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """`spendgate serve` bounds request heads (httptools alone does not): 431, and other calls go on."""
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    with serve_in_thread(FakeAnthropic()) as upstream_url, replica(db_url, upstream_url, tmp_path) as (url, _):
        host, port = urlsplit(url).hostname or "", urlsplit(url).port or 0
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-junk: ")
            answer = b""
            # The server may close with part of the 4 MB unread, which resets the connection and can drop the
            # answer on the way: the refusal is then the reset itself (without the bound it would be a 401).
            with contextlib.suppress(OSError):
                for _ in range(64):
                    sock.sendall(b"a" * 65536)
            with contextlib.suppress(ConnectionResetError):
                answer = sock.recv(65536)
        status, _, _ = send(url, "POST", "/v1/messages", json.dumps(MESSAGE).encode(), {"x-api-key": key})
        # The bound is on the head only: a large body in the same first read as the head is no head.
        large = {**MESSAGE, "messages": [{"role": "user", "content": "x" * 1_000_000}]}
        large_status, _, _ = send(url, "POST", "/v1/messages", json.dumps(large).encode(), {"x-api-key": key})
    assert large_status == 200
    if answer:
        head, _, refusal = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431")
        assert_anthropic_shaped(refusal)
    assert status == 200


def test_image_shaped_text_is_priced_as_text(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """200 KB of base64 in a tool's input_schema, shaped like an image block, is input text to Anthropic: the
    worst case prices its bytes, so a $0.05 budget refuses the call (it let a $0.75 call through before)."""
    decoy = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 200_000}}
    tool: Any = {"name": "t", "input_schema": {"type": "object", "properties": {"x": decoy}}}
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal("0.05"))) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                client.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=10,
                    messages=[{"role": "user", "content": "Hi"}],
                    tools=[tool],
                )
        assert refused.value.status_code == 402
        assert stack.upstream.requests == []
        assert get_team(engine, "research").spent_usd == 0
