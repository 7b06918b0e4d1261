"""`spendgate serve` as a real process: SIGTERM under load loses no usage record."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import Engine

from proxy.export import iter_usage
from proxy.teams import TeamSettings, create_key, create_team
from tests.servers import serve_in_thread
from tests.upstream import UPSTREAM_KEY, FakeAnthropic

CALLS = 24


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "spendgate serve exited early"
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("spendgate serve did not become healthy")


def test_sigterm_under_load_drains_every_record(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings())
    _, key = create_key(engine, "research")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with serve_in_thread(FakeAnthropic()) as upstream_url:
        env = {
            **os.environ,
            "SPENDGATE_DB_URL": db_url,
            "ANTHROPIC_API_KEY": UPSTREAM_KEY,
            "SPENDGATE_SPILL_DIR": str(tmp_path / "spill"),
        }
        log = tmp_path / "serve.log"
        with log.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--upstream", upstream_url],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_healthy(url, process)
            statuses: list[int] = []

            def call(n: int) -> None:
                body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [], "stream": n % 2 == 0}
                # Slow streams: still running when SIGTERM arrives.
                headers = {"x-api-key": key, "x-fake-chunk": "200", "x-fake-delay": "0.1"}
                response = httpx.post(f"{url}/v1/messages", json=body, headers=headers, timeout=30)
                statuses.append(response.status_code)

            threads = [threading.Thread(target=call, args=(n,)) for n in range(CALLS)]
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(timeout=30)
            # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
            assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = log.read_text()
    records = [record for _, record in iter_usage(engine)]
    assert len(statuses) == CALLS, stderr
    assert statuses == [200] * CALLS
    # Every call that was answered has exactly one record, written before the process exited.
    assert len(records) == CALLS, stderr
    assert len({r["id"] for r in records}) == CALLS
    assert {r["outcome"] for r in records} == {"ok"}
    assert not (tmp_path / "spill").exists()
