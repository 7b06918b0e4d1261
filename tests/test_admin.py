"""The admin HTTP API, in-process: the same operations as the CLI, over JSON, behind the admin token."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.ledger.commit import insert_records
from proxy.ledger.teams import TeamSettings, create_team
from tests.servers import serve_in_thread
from tests.stack import settings_for
from tests.test_writer import make_record
from tests.upstream import fixture

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def make_client(db_url: str, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(token: str | None = TOKEN) -> TestClient:
        def upstream(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=fixture("message.json"), headers={"content-type": "application/json"})

        settings = settings_for(db_url, "https://upstream.test", tmp_path, admin_token=token)
        client = TestClient(create_app(settings, transport=httpx.MockTransport(upstream))).__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_without_a_token_the_api_does_not_exist(make_client: Callable[..., TestClient]) -> None:
    response = make_client(token=None).get("/admin/teams", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


SEND_TOKEN = "Send 'Authorization: Bearer <SPENDGATE_ADMIN_TOKEN>'"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, f"{SEND_TOKEN}, or sign in to the dashboard as an admin.", id="missing"),
        pytest.param({"authorization": "Bearer wrong"}, f"{SEND_TOKEN}.", id="wrong"),
    ],
)
def test_wrong_token_is_401(make_client: Callable[..., TestClient], headers: dict[str, str], message: str) -> None:
    response = make_client().get("/admin/teams", headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": message},
    }


def test_team_lifecycle(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    created = client.post(
        "/admin/teams",
        headers=AUTH,
        json={"name": "research", "budget_usd": "250.10", "period": "week", "models": ["claude-sonnet-4-6"]},
    )
    assert created.status_code == 201
    assert created.json()["budget_usd"] == "250.10"
    assert created.json()["remaining_usd"] == "250.10"
    assert client.post("/admin/teams", headers=AUTH, json={"name": "research"}).status_code == 409
    # JSON numbers are read as exact decimals.
    patched = client.patch("/admin/teams/research", headers=AUTH, content=b'{"budget_usd": 0.1, "models": null}')
    assert patched.status_code == 200
    assert (patched.json()["budget_usd"], patched.json()["models"], patched.json()["period"]) == ("0.1", None, "week")
    assert client.get("/admin/teams/research", headers=AUTH).json()["budget_usd"] == "0.1"
    assert [team["name"] for team in client.get("/admin/teams", headers=AUTH).json()["data"]] == ["research"]
    assert client.get("/admin/teams/nobody", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param({"name": "t", "period": "year"}, "'period': Input should be 'day'", id="period"),
        pytest.param({"name": "t", "budget_usd": "lots"}, "'budget_usd': Input should be a valid decimal", id="budget"),
        pytest.param({"name": "t", "budget_usd": "-1"}, "'budget_usd': Input should be greater than", id="negative"),
        pytest.param({"name": "t", "budget_usd": "NaN"}, "'budget_usd'", id="nan"),
        pytest.param({"name": "t", "max_output_tokens": "many"}, "'max_output_tokens': Input should be", id="cap"),
        pytest.param({"name": "t", "max_output_tokens": True}, "'max_output_tokens'", id="bool-cap"),
        pytest.param({"name": "t", "models": []}, "'models': List should have at least 1 item", id="models"),
        pytest.param({"name": "t", "colour": "red"}, "unknown field 'colour'", id="unknown"),
        pytest.param({"budget_usd": "1"}, "'name' is required", id="no-name"),
        pytest.param({"name": "no spaces"}, "'name': String should match pattern", id="bad-name"),
        pytest.param({"name": "t", "max_output_tokens": 10**29}, "'max_output_tokens'", id="huge-cap"),
        pytest.param({"name": "t", "retry_window_seconds": 2**31}, "'retry_window_seconds'", id="huge-window"),
        pytest.param({"name": "t", "budget_usd": "1E-999999"}, "'budget_usd'", id="tiny-budget"),
        pytest.param({"name": "t", "models": [" "]}, "'models.0'", id="blank-model"),
    ],
)
def test_bad_team_bodies_are_400(make_client: Callable[..., TestClient], body: dict[str, object], message: str) -> None:
    response = make_client().post("/admin/teams", headers=AUTH, json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_keys_created_work_and_revoked_stop_at_once(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    client.post("/admin/teams", headers=AUTH, json={"name": "research"})
    created = client.post("/admin/teams/research/keys", headers=AUTH, json={"name": "ci", "budget_usd": 5})
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    assert created.json()["budget_usd"] == "5"
    call = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": []}
    assert client.post("/v1/messages", headers={"x-api-key": key}, json=call).status_code == 200
    listed = client.get("/admin/teams/research/keys", headers=AUTH).json()["data"]
    assert [k["id"] for k in listed] == [key_id]
    assert key not in str(listed)
    assert client.delete(f"/admin/keys/{key_id}", headers=AUTH).json()["revoked_at"] is not None
    assert client.post("/v1/messages", headers={"x-api-key": key}, json=call).status_code == 401
    assert client.delete("/admin/keys/key_missing", headers=AUTH).status_code == 404
    assert client.post("/admin/teams/nobody/keys", headers=AUTH, json={}).status_code == 404


def test_usage_pages_with_a_cursor(make_client: Callable[..., TestClient], engine: Engine) -> None:
    client = make_client()
    insert_records(engine, [make_record(id=f"sgr_{n:02}", team="a" if n % 2 else "b") for n in range(25)])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        page = client.get("/admin/usage", headers=AUTH, params=params).json()
        seen += [record["id"] for record in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == [f"sgr_{n:02}" for n in range(25)]
    only_a = client.get("/admin/usage", headers=AUTH, params={"team": "a", "limit": "1000"}).json()["data"]
    assert len(only_a) == 12
    assert only_a[0]["cost_usd"] == str(Decimal("0.00045"))
    assert client.get("/admin/usage", headers=AUTH, params={"limit": "0"}).status_code == 400
    for odd in ("1_0", "+5", " 5", "1.0"):
        assert client.get("/admin/usage", headers=AUTH, params={"limit": odd}).status_code == 400, odd
    assert client.get("/admin/usage", headers=AUTH, params={"cursor": "%%%"}).status_code == 400
    assert client.get("/admin/usage", headers=AUTH, params={"since": "soon"}).status_code == 400


def test_report_over_http(make_client: Callable[..., TestClient], engine: Engine) -> None:
    insert_records(engine, [make_record(id="r1", team="a"), make_record(id="r2", team="b", cost_usd=Decimal("1.5"))])
    response = make_client().get("/admin/report", headers=AUTH, params={"by": "team"})
    assert [(row["team"], row["calls"], row["cost_usd"]) for row in response.json()["data"]] == [
        ("a", 1, "0.00045"),
        ("b", 1, "1.5"),
    ]
    assert make_client().get("/admin/report", headers=AUTH, params={"by": "colour"}).status_code == 400


def test_report_pages_over_http(make_client: Callable[..., TestClient], engine: Engine) -> None:
    """`limit` and `cursor` page a report by group (as `/admin/usage` pages records): every group once, in the
    whole report's order; a cursor that no report gave, or a bad limit, is a 400 in Anthropic's error shape."""
    client = make_client()
    sessions = [None, "", "B", "a", "z", "\u00fc"]
    insert_records(engine, [make_record(id=f"sgr_s{n}", session=sessions[n % 6], agent="x") for n in range(23)])
    whole = client.get("/admin/report", headers=AUTH, params={"by": "session,agent"}).json()
    assert (whole["has_more"], whole["next_cursor"]) == (False, None)
    assert [row["session"] for row in whole["data"]] == [None, "", "B", "a", "z", "\u00fc"]
    seen: list[dict[str, object]] = []
    cursor: str | None = None
    while True:
        params = {"by": "session,agent", "limit": "4", **({"cursor": cursor} if cursor else {})}
        page = client.get("/admin/report", headers=AUTH, params=params).json()
        seen += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == whole["data"]
    for odd in ({"limit": "0"}, {"limit": "1001"}, {"limit": "+2"}, {"cursor": "%%%"}, {"cursor": "WyJhIl0="}):
        refused = client.get("/admin/report", headers=AUTH, params={"by": "session,agent", **odd})
        assert refused.status_code == 400, odd
        assert refused.json()["error"]["type"] == "invalid_request_error", odd


def test_a_ledger_failure_is_a_503_like_the_proxy_gives(make_client: Callable[..., TestClient], engine: Engine) -> None:
    client = make_client()
    # The ledger breaking under the running server: every query on teams fails until the table is back (the
    # PostgreSQL ledger is shared by the whole test session, so it must come back).
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE teams RENAME TO teams_gone"))
    try:
        response = client.get("/admin/teams", headers=AUTH)
        proxied = client.post(
            "/v1/messages",
            json={"model": "m", "max_tokens": 1, "messages": []},
            headers={"x-api-key": "sk-sg-unknown"},
        )
    finally:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE teams_gone RENAME TO teams"))
    assert response.status_code == 503
    assert response.headers["x-spendgate-error"] == "ledger_unavailable"
    assert response.json()["error"]["type"] == "api_error"
    assert (proxied.status_code, proxied.headers["x-spendgate-error"]) == (503, "ledger_unavailable")


@pytest.fixture
def admin_url(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[str]:
    """The whole app under uvicorn on loopback, with the admin API on and team `research` in the ledger."""
    create_team(engine, "research", TeamSettings(), actor="test")
    settings = settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN)
    with serve_in_thread(create_app(settings)) as url:
        yield url


BODY_ROUTES = [
    ("POST", "/admin/teams"),
    ("PATCH", "/admin/teams/research"),
    ("POST", "/admin/teams/research/keys"),
    ("PATCH", "/admin/keys/key_missing"),
    ("PUT", "/admin/teams/research/user-budgets"),
]


def nested(shape: str, depth: int) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"name":"t","models":' + b"[" * depth + b"]" * depth + b"}"


def assert_refused(status: int, body: bytes, expected: int, error_type: str) -> None:
    """An answer in Anthropic's error shape with that status and type."""
    assert status == expected, body[:300]
    payload = json.loads(body)
    assert payload["type"] == "error" and payload["error"]["type"] == error_type
    assert isinstance(payload["error"]["message"], str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    depth=st.integers(1, 2_000) | st.integers(2_000, 150_000),
    shape=st.sampled_from(["array", "object", "field"]),
    route=st.sampled_from(BODY_ROUTES),
)
@example(depth=100_000, shape="array", route=BODY_ROUTES[0])
@example(depth=100_000, shape="object", route=BODY_ROUTES[1])
def test_deeply_nested_bodies_are_400_like_any_malformed_body(
    admin_url: str, depth: int, shape: str, route: tuple[str, str]
) -> None:
    method, path = route
    answer = httpx.request(method, f"{admin_url}{path}", headers=AUTH, content=nested(shape, depth), timeout=30)
    assert_refused(answer.status_code, answer.content, 400, "invalid_request_error")


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request head (and whatever of a body) as given, then read the answer: no client fills in the rest."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_an_admin_body_over_a_mebibyte_is_413(admin_url: str) -> None:
    def team_named(size: int) -> bytes:
        """A team create of exactly `size` bytes."""
        return b'{"name":"' + b"x" * (size - len(b'{"name":""}')) + b'"}'

    mebibyte = 1024 * 1024
    under = httpx.post(f"{admin_url}/admin/teams", headers=AUTH, content=team_named(mebibyte), timeout=30)
    assert_refused(under.status_code, under.content, 400, "invalid_request_error")  # the name's pattern
    over = httpx.post(f"{admin_url}/admin/teams", headers=AUTH, content=team_named(mebibyte + 1), timeout=30)
    assert_refused(over.status_code, over.content, 413, "request_too_large")
    assert "1048576 bytes" in over.json()["error"]["message"]
    # Refused on its Content-Length, before a byte more is read: the other 10 GiB never come.
    head = (
        f"POST /admin/teams HTTP/1.1\r\nhost: spendgate\r\nauthorization: Bearer {TOKEN}\r\n"
        f"content-type: application/json\r\ncontent-length: {10 * 1024**3}\r\n\r\n"
    )
    assert_refused(*raw_request(admin_url, head, b'{"name":'), 413, "request_too_large")


def test_a_chunked_admin_body_is_cut_off_at_the_limit(admin_url: str) -> None:
    """Without a Content-Length the bytes are counted as they arrive: the answer comes while the client is still
    sending (it would send 64 MiB), not after the server has taken it all in."""
    parts = urlsplit(admin_url)
    head = (
        f"PATCH /admin/teams/research HTTP/1.1\r\nhost: spendgate\r\nauthorization: Bearer {TOKEN}\r\n"
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"[" * 65536
    most, sent = 64 * 1024 * 1024, 0
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < most and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            if sent == most:
                sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, body = response.status, response.read()
    assert_refused(status, body, 413, "request_too_large")
    assert sent < most
