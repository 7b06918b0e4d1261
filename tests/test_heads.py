"""Request heads that never finish arriving, against `spendgate serve` as a real process on loopback.

A connection costs the server a file descriptor from the moment it is accepted, before any byte or key: without
a deadline and a bound on heads still arriving, a few hundred silent connections exhaust the descriptors and
every valid call is refused.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxy import serving
from proxy.config import ConfigError, Settings
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from proxy.serving import BoundedHttpToolsProtocol, PendingHeads
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

# Connections and their heads, before any ledger work.
pytestmark = pytest.mark.any_dialect
HALF_HEAD = b"POST /v1/messages HTTP/1.1\r\nhost: spendgate\r\ncontent-type: application/json\r\n"
MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
# Longer than any test here runs, for tests about the bounds rather than the deadline.
NO_DEADLINE = "600"


@contextlib.contextmanager
def spendgate_serve(
    engine: Engine, db_url: str, tmp_path: Path, env: dict[str, str], files: tuple[int, int] | None = None
) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """`spendgate serve` with `env` (and, given `files`, RLIMIT_NOFILE lowered to that soft and hard limit) in front
    of a fake upstream; yields its URL, a key of team `research`, and the process."""
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")

    def lower_limit() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, files)

    with (
        serve_in_thread(FakeAnthropic()) as upstream_url,
        replica(db_url, upstream_url, tmp_path, env=env, preexec_fn=lower_limit) as (url, process),
    ):
        yield url, key, process


def address(url: str) -> tuple[str, int]:
    """The host and port of a base URL."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 0


def connect(url: str, source: str = "127.0.0.1", sent: bytes = b"") -> socket.socket:
    """A connection from `source` that has sent `sent` and nothing more."""
    sock = socket.create_connection(address(url), timeout=10, source_address=(source, 0))
    sock.sendall(sent)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a `content-length`, leaving the connection open."""
    answer = b""
    while True:
        head, blank, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.I) if blank else None
        if length and len(body) >= int(length[1]):
            return answer
        answer += sock.recv(65536)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock`, without waiting (whatever it sent first is read and dropped)."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    return False


def call(url: str, source: str, method: str, path: str, key: str = "") -> int:
    """A complete call from `source` on a new connection; its status."""
    connection = http.client.HTTPConnection(*address(url), timeout=10, source_address=(source, 0))
    try:
        body = json.dumps(MESSAGE).encode() if method == "POST" else None
        connection.request(method, path, body, {"x-api-key": key, "content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_heads_that_do_not_arrive_in_time_are_closed(engine: Engine, db_url: str, tmp_path: Path, workers: str) -> None:
    env = {"SPENDGATE_HEAD_TIMEOUT_SECONDS": "1", "SPENDGATE_WORKERS": workers}
    with spendgate_serve(engine, db_url, tmp_path, env) as (url, _, _):
        opened = time.monotonic()
        silent = connect(url)
        half = connect(url, sent=HALF_HEAD)
        # A keep-alive connection: the deadline runs again from the end of each response.
        reused = connect(url, sent=b"GET /healthz HTTP/1.1\r\nhost: spendgate\r\n\r\n")
        answered = read_answer(reused)
        reused.sendall(HALF_HEAD)
        with silent, half, reused:
            silent_answer, silent_after = read_to_end(silent), time.monotonic() - opened
            half_answer, half_after = read_to_end(half), time.monotonic() - opened
            reused_answer = read_to_end(reused)
    assert silent_answer == b""
    assert 1 <= silent_after < 10
    assert answered.startswith(b"HTTP/1.1 200")
    for answer in (half_answer, reused_answer):
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"http/1.1 408 request timeout"
        assert b"x-spendgate-error: head_timeout" in lines
        assert b"connection: close" in lines
        error = json.loads(body)
        assert error["type"] == "error"
        assert error["error"]["type"] == "timeout_error"
        assert "within 1 seconds" in error["error"]["message"]
        assert "SPENDGATE_HEAD_TIMEOUT_SECONDS" in error["error"]["message"]
    assert 1 <= half_after < 10


def test_a_keep_alive_client_outlives_the_head_deadline(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Every head of a busy keep-alive connection arrives in time, however long the connection lives."""
    with spendgate_serve(engine, db_url, tmp_path, {"SPENDGATE_HEAD_TIMEOUT_SECONDS": "0.5"}) as (url, key, _):
        connection = http.client.HTTPConnection(*address(url), timeout=10)
        statuses: list[int] = []

        def one_more() -> bool:
            if len(statuses) % 2:
                connection.request("POST", "/v1/messages", json.dumps(MESSAGE).encode(), {"x-api-key": key})
            else:
                connection.request("GET", "/healthz")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            # http.client would quietly reconnect if the server had closed the connection.
            assert connection.sock is first, "the server closed the keep-alive connection"
            return time.monotonic() - opened > 2

        with contextlib.closing(connection):
            connection.connect()
            first, opened = connection.sock, time.monotonic()
            wait_until(one_more, "the connection to outlive four head deadlines")
    assert len(statuses) >= 4
    assert set(statuses) == {200}


def test_the_oldest_pending_head_of_an_address_is_closed_first(engine: Engine, db_url: str, tmp_path: Path) -> None:
    env = {"SPENDGATE_HEAD_TIMEOUT_SECONDS": NO_DEADLINE, "SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT": "3"}
    with spendgate_serve(engine, db_url, tmp_path, env) as (url, _, _), contextlib.ExitStack() as held:
        stalled: list[socket.socket] = []

        def stall() -> None:
            stalled.append(held.enter_context(connect(url, sent=HALF_HEAD)))
            # The server takes connections in the order they arrived: once a later one is answered (from an address
            # of its own, outside this one's bound), this one has been taken.
            assert call(url, "127.0.0.2", "GET", "/healthz") == 200

        for _ in range(3):
            stall()
        assert not any(closed_by_server(sock) for sock in stalled)
        stall()
        wait_until(lambda: any(closed_by_server(sock) for sock in stalled), "a pending head to be closed")
        assert [closed_by_server(sock) for sock in stalled] == [True, False, False, False]
        # A quick client on the crowded address gets in and closes nobody (its head never stalls); the next
        # stalled head closes the oldest one left.
        assert call(url, "127.0.0.1", "GET", "/healthz") == 200
        assert [closed_by_server(sock) for sock in stalled] == [True, False, False, False]
        stall()
        wait_until(lambda: closed_by_server(stalled[1]), "the second oldest pending head to be closed")
        assert [closed_by_server(sock) for sock in stalled] == [True, True, False, False, False]


def test_a_burst_of_connections_from_one_address_is_served(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Clients behind one address connect at once (a fleet behind a NAT, a load balancer warming its pool), and a
    busy server accepts them before it reads their heads: more wait to be read than the address's bound allows, but
    none has stalled, so none is closed (200 SDK clients were cut off so under load)."""
    env = {"SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT": "3"}
    with spendgate_serve(engine, db_url, tmp_path, env) as (url, _, _), contextlib.ExitStack() as held:
        # Connected first, sent after: heads the server has not read yet (40 connections take milliseconds, far
        # below the second after which a head counts as stalled).
        burst = [held.enter_context(connect(url)) for _ in range(40)]
        for sock in burst:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: spendgate\r\nconnection: close\r\n\r\n")
        answers = [read_to_end(sock) for sock in burst]
    assert [answer[:12] for answer in answers] == [b"HTTP/1.1 200"] * 40


def test_stalled_heads_cannot_lock_out_valid_calls(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """300 stalled heads against a server allowed 256 descriptors: 150 from the address the valid calls come from
    and 15 from each of ten others (under the per-address bound, so only the bound on all of them holds those)."""
    env = {"SPENDGATE_HEAD_TIMEOUT_SECONDS": NO_DEADLINE}
    with (
        spendgate_serve(engine, db_url, tmp_path, env, files=(128, 256)) as (url, key, process),
        contextlib.ExitStack() as held,
    ):
        # `spendgate serve` raises its soft limit to the hard one.
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
            ["256", "256"]
        ]
        sources = ["127.0.0.1"] * 150 + [f"127.0.1.{n % 10 + 1}" for n in range(150)]
        stalled = [held.enter_context(connect(url, source, HALF_HEAD)) for source in sources]
        statuses = [
            call(url, source, method, path, key)
            for source in ("127.0.0.1", "127.0.0.2")
            for method, path in (("GET", "/healthz"), ("POST", "/v1/messages"))
        ]
        still_open = len(stalled) - sum(closed_by_server(sock) for sock in stalled)
    assert statuses == [200] * 4
    # At most half the descriptors hold heads that are still arriving.
    assert still_open <= 128
    # Hundreds of connections closed, one line logged (the next comes as a sum a minute later).
    assert next(tmp_path.glob("serve-*.log")).read_text().count("closed a connection from") == 1


def test_closures_are_logged_once_then_summed_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serving, "CLOSURES_LOGGED_EVERY_SECONDS", 1.0)
    monkeypatch.setattr(BoundedHttpToolsProtocol, "heads", PendingHeads(timeout=1.5, per_client=1, total=100))
    caplog.set_level(logging.WARNING, logger="spendgate")
    app = Starlette(routes=[Route("/", PlainTextResponse)])
    with serve_in_thread(app, http=BoundedHttpToolsProtocol) as url, contextlib.ExitStack() as held:
        for _ in range(20):
            held.enter_context(connect(url, sent=HALF_HEAD))

        def closures() -> list[str]:
            return [record.getMessage() for record in caplog.records if record.name == "spendgate"]

        def counted() -> int:
            # The first closure has a line of its own; each summary says how many more there were.
            return sum(int(more[1]) if (more := re.match(r"closed (\d+) more", line)) else 1 for line in closures())

        # 19 pushed out by the next one from the same address, and the last one past its deadline.
        wait_until(lambda: counted() == 20, "every closed connection to be logged")
    lines = closures()
    assert lines[0] == (
        "closed a connection from 127.0.0.1: over 1 heads still arriving from its address "
        "(SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT)"
    )
    assert len(lines) <= 4
    assert "from 1 address(es)" in lines[1]
    assert "18 as over 1 heads still arriving from its address" in " ".join(lines)
    assert "1 as its request head took over 1.5 s (SPENDGATE_HEAD_TIMEOUT_SECONDS)" in " ".join(lines)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("SPENDGATE_HEAD_TIMEOUT_SECONDS", "0", "must be above 0"),
        ("SPENDGATE_HEAD_TIMEOUT_SECONDS", "-1", "must not be negative"),
        ("SPENDGATE_HEAD_TIMEOUT_SECONDS", "soon", "not a valid float"),
        ("SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT", "-1", "must not be negative"),
        ("SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT", "2.5", "not a valid int"),
    ],
)
def test_bad_head_settings_are_refused(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_environ({variable: value})


def test_head_settings_are_read() -> None:
    assert (Settings().head_timeout_seconds, Settings().max_pending_heads_per_client) == (10.0, 32)
    settings = Settings.from_environ(
        {"SPENDGATE_HEAD_TIMEOUT_SECONDS": "2.5", "SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT": "0"}
    )
    assert (settings.head_timeout_seconds, settings.max_pending_heads_per_client) == (2.5, 0)
