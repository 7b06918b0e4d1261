"""`spendgate serve` as a real process: SIGTERM under load loses no usage record."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import httpx
from sqlalchemy import Engine

from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

CALLS = 24


def test_sigterm_under_load_drains_every_record(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    statuses: list[int] = []
    upstream = FakeAnthropic()
    with serve_in_thread(upstream) as upstream_url, replica(db_url, upstream_url, tmp_path) as (url, process):

        def call(n: int) -> None:
            body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "stream": n % 2 == 0}
            # Slow streams: still running when SIGTERM arrives.
            headers = {"x-api-key": key, "x-fake-chunk": "100", "x-fake-delay": "0.2"}
            response = httpx.post(f"{url}/v1/messages", json=body, headers=headers, timeout=30)
            statuses.append(response.status_code)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(CALLS)]
        for thread in threads:
            thread.start()
        # Every call has reached the upstream (none is still connecting): the signal lands mid-flight.
        wait_until(lambda: len(upstream.requests) == CALLS, "every call to reach the upstream")
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    records = [record for _, record in iter_usage(engine)]
    assert statuses == [200] * CALLS
    # Every call that was answered has exactly one record, written before the process exited.
    assert len(records) == CALLS
    assert len({r["id"] for r in records}) == CALLS
    assert {r["outcome"] for r in records} == {"ok"}
    # Nothing spilled, and the journal cleaned up after itself.
    assert sorted(path.name for path in (tmp_path / "spill").iterdir()) == []


def test_a_call_cut_by_the_shutdown_grace_is_interrupted(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    grace = {"SPENDGATE_SHUTDOWN_GRACE_SECONDS": "1"}
    with (
        serve_in_thread(upstream) as upstream_url,
        replica(db_url, upstream_url, tmp_path, env=grace) as (url, process),
    ):
        body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "stream": True}
        # A stream far longer than the grace: message_start, then the rest 5 s later.
        headers = {"x-api-key": key, "x-fake-chunk": "1000", "x-fake-delay": "5"}

        def call() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/v1/messages", json=body, headers=headers, timeout=60)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        wait_until(lambda: upstream.requests, "the stream to start")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        caller.join(timeout=60)
    [record] = [record for _, record in iter_usage(engine)]
    assert record["outcome"] == "interrupted"
    # The input was billed when the stream started: the usage seen so far is kept.
    assert record["input_tokens"] > 0
