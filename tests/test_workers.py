"""`spendgate serve --workers N`: N processes on one port, each a replica of its own on the one ledger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from proxy.ledger.budgets import LEASE_PREFIX
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.schema import BudgetHold, Instance
from proxy.ledger.teams import TeamSettings, create_team, get_team
from tests.replicas import free_port, replica
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
WORKERS = {"SPENDGATE_WORKERS": "2", "SPENDGATE_HEARTBEAT_SECONDS": "0.3", "SPENDGATE_HEARTBEAT_LIMIT_SECONDS": "2"}


def workers_of(parent: int) -> list[int]:
    """The serving worker processes of a `spendgate serve --workers N` (not multiprocessing's helpers)."""
    found = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(child))
    return found


def calls_journaled(spill: Path) -> dict[str, int]:
    """Calls each process has journaled as started, by instance (what each worker carried)."""
    started: dict[str, int] = {}
    for path in spill.glob("journal-*.jsonl"):
        instance = path.name.removeprefix("journal-").rsplit(".", 2)[0]
        started[instance] = started.get(instance, 0) + path.read_bytes().count(b'["s",')
    return started


def calls_counted(metrics_url: str) -> float:
    families = text_string_to_metric_families(httpx.get(metrics_url).text)
    return sum(s.value for f in families if f.name == "spendgate_calls" for s in f.samples if s.name.endswith("_total"))


def count(engine: Engine, table: type[Instance] | type[BudgetHold]) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def send(url: str, key: str, n: int, headers: dict[str, str] | None = None) -> list[int]:
    statuses: list[int] = []

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.post(
                f"{url}/v1/messages", json=MESSAGE, headers={"x-api-key": key, **(headers or {})}, timeout=60
            )
            statuses.append(answer.status_code)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return statuses


def test_two_workers_both_serve_and_keep_every_guarantee(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(100)), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    metrics = f"http://127.0.0.1:{free_port()}/metrics"
    env = {**WORKERS, "SPENDGATE_METRICS_ADDR": metrics.split("/")[2]}
    with serve_in_thread(upstream) as upstream_url:
        with replica(db_url, upstream_url, tmp_path, env=env) as (url, process):
            wait_until(lambda: len(workers_of(process.pid)) == 2, "two workers")
            wait_until(lambda: count(engine, Instance) == 2, "each worker to register as a replica")
            statuses = send(url, key, 120, {"x-fake-hang": "0.05"})
            carried = calls_journaled(tmp_path / "spill")
            assert len(carried) == 2 and min(carried.values()) > 0, carried
            # The supervisor's metrics address sums both workers' counts.
            wait_until(lambda: calls_counted(metrics) == 120, "both workers' calls in /metrics")
        # SIGTERM: both drain, end their leases and retire.
        assert process.returncode == 0
    assert statuses == [200] * 120
    records = [record for _, record in iter_usage(engine)]
    assert len(records) == len(upstream.requests) == 120
    team = get_team(engine, "research")
    assert team.spent_usd == sum(Decimal(r["cost_usd"]) for r in records)
    assert team.reserved_usd == 0
    assert count(engine, Instance) == count(engine, BudgetHold) == 0


def test_a_killed_worker_is_replaced_and_its_calls_recorded(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(100)), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    with serve_in_thread(upstream) as upstream_url:
        with replica(db_url, upstream_url, tmp_path, env=WORKERS) as (url, process):
            wait_until(lambda: count(engine, Instance) == 2, "both workers serving")
            before = set(workers_of(process.pid))
            done: list[list[int]] = []
            load = threading.Thread(target=lambda: done.append(send(url, key, 40, {"x-fake-hang": "0.5"})))
            load.start()
            wait_until(lambda: len(upstream.requests) == 40, "every call in flight upstream")
            victim = max(before, key=lambda pid: calls_journaled_by_pid(tmp_path / "spill", pid))
            os.kill(victim, signal.SIGKILL)
            load.join(timeout=120)
            # uvicorn's supervisor starts a new worker, which replays the dead one's journal.
            wait_until(lambda: len(set(workers_of(process.pid)) - before) == 1, "a replacement worker")
            wait_until(
                lambda: (
                    len([r for _, r in iter_usage(engine) if not str(r["id"]).startswith(LEASE_PREFIX)])
                    == len(upstream.requests)
                ),
                "a record for every call the upstream saw",
            )
    records = [record for _, record in iter_usage(engine)]
    calls = [r for r in records if not str(r["id"]).startswith(LEASE_PREFIX)]
    assert len(calls) == len({r["id"] for r in calls}) == len(upstream.requests)
    assert {r["outcome"] for r in calls} <= {"ok", "interrupted"}
    # A lease the reaper recorded at its amount was corrected to $0 by the journal replay.
    assert all(Decimal(r["cost_usd"]) == 0 for r in records if str(r["id"]).startswith(LEASE_PREFIX))
    team = get_team(engine, "research")
    assert team.spent_usd == sum(Decimal(r["cost_usd"]) for r in calls)
    assert team.reserved_usd == 0
    assert count(engine, BudgetHold) == 0


def calls_journaled_by_pid(spill: Path, pid: int) -> int:
    """How busy a worker is: the calls in its open journal files (found through its file descriptors)."""
    started = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = Path(os.readlink(fd))
            if target.parent == spill and target.suffix == ".jsonl":
                started += target.read_bytes().count(b'["s",')
    return started


def test_workers_refuse_an_in_memory_ledger(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--workers", "2", "--db", "sqlite://"],
        env={**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "in-memory SQLite database would be one per worker" in result.stderr
