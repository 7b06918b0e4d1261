"""The ledger under faults and hostile data: nothing stops the writer, nothing is lost, nothing is counted twice.

Real processes (`spendgate serve`), real signals (SIGTERM, SIGKILL), a real database made to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from proxy.config import WriterMode
from proxy.gateway.waits import outliving, shielded
from proxy.instruments import Metrics
from proxy.ledger.audit import verify
from proxy.ledger.budgets import LEASE_PREFIX
from proxy.ledger.counters import team_counter
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.schema import BudgetHold, Instance, UsageRow
from proxy.ledger.teams import TeamSettings, create_team, get_team
from proxy.ledger.writer import Writer
from proxy.ledger.writes import InThread
from proxy.types import Hold
from tests.conftest import POSTGRES_URL
from tests.locks import ledger_locked
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.stack import running_stack, running_stack_again
from tests.test_limits_wire import table_gone
from tests.test_writer import make_record, writer_for
from tests.upstream import FakeAnthropic
from tests.waiting import wait_for, wait_until

MESSAGE = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
# Fast heartbeats, so a dead replica's holds are taken over within seconds.
HEARTBEATS = {"SPENDGATE_HEARTBEAT_SECONDS": "0.3", "SPENDGATE_HEARTBEAT_LIMIT_SECONDS": "2"}


def records(engine: Engine) -> list[dict[str, Any]]:
    return [record for _, record in iter_usage(engine)]


def count(engine: Engine, table: Any = UsageRow) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_a_record_the_ledger_refuses_never_blocks_the_others(
    engine: Engine, tmp_path: Path, mode: WriterMode
) -> None:
    writer = writer_for(engine, tmp_path, mode, batch_size=50)
    writer.start()
    for n in range(10):
        writer.submit(make_record(id=f"sgr_{n}"))
        if n == 4:
            # A lone surrogate no database driver can encode: refused as data, every time.
            writer.submit(make_record(id="sgr_poison", team="\ud800"))
    await writer.close()
    assert sorted(r["id"] for r in records(engine)) == sorted(f"sgr_{n}" for n in range(10))
    [aside] = (tmp_path / "spill").glob("refused-*.jsonl")
    [line] = aside.read_text().splitlines()
    assert json.loads(line)["id"] == "sgr_poison" and json.loads(line)["error"]


@pytest.mark.anyio
async def test_a_bug_in_the_write_path_is_loud_and_sets_nothing_aside(engine: Engine, tmp_path: Path) -> None:
    """A record our own settlement cannot handle (a float cost, as a bug would make) is not data the ledger
    refused: it must not be set aside (with every record after it) while all looks well. It stays queued, and the
    writer says why."""
    writer = writer_for(engine, tmp_path, batch_size=50, stall_seconds=0.2)
    writer.start()
    counter = team_counter(1, "research", "month", Decimal(10), make_record().started_at)
    hold = Hold(call_id="sgr_bug", counters=(counter,), amount=Decimal(0), held=False)
    bad: Any = 0.5
    writer.submit(make_record(id="sgr_bug", cost_usd=bad, hold=hold))
    await wait_for(lambda: writer.problem is not None and "TypeError" in writer.problem, "the writer to say why")
    assert writer.pending == 1
    assert not list((tmp_path / "spill").glob("refused-*.jsonl"))
    assert count(engine) == 0
    # At shutdown it is spilled for the next start, like records the ledger would not take: nothing is lost.
    await writer.close()
    [spilled] = (tmp_path / "spill").glob("unwritten-*.jsonl")
    assert json.loads(spilled.read_text())["id"] == "sgr_bug"


@pytest.mark.anyio
async def test_a_failing_collaborator_does_not_stop_the_writer(engine: Engine, tmp_path: Path) -> None:
    failures: list[int] = []

    def alert(crossed: object) -> None:
        failures.append(1)
        raise RuntimeError("webhook sender exploded")

    writer = writer_for(engine, tmp_path, on_soft_limit=alert, batch_size=1)
    writer.start()
    counter = team_counter(1, "research", "month", Decimal(10), make_record().started_at)
    hold = Hold(call_id="sgr_big", counters=(counter,), amount=Decimal(0), held=False)
    writer.submit(make_record(id="sgr_big", cost_usd=Decimal(9), hold=hold))
    await wait_for(lambda: failures, "the soft-limit alert to fail")
    for n in range(5):
        writer.submit(make_record(id=f"sgr_after_{n}"))
    await wait_for(lambda: count(engine) == 6, "the records after the failure")
    assert writer.problem is None
    await writer.close()


@pytest.mark.anyio
async def test_records_that_cannot_be_set_aside_stay_in_memory_until_they_can(engine: Engine, tmp_path: Path) -> None:
    blocked = tmp_path / "spill"
    blocked.write_text("a file where the folder should be")  # not writable as a folder: like a broken volume
    writer = Writer(
        InThread(engine),
        flush_seconds=0.01,
        batch_size=10,
        drain_seconds=5,
        spill_dir=blocked,
        instance="test",
        metrics=Metrics(),
    )
    writer.start()
    writer.submit(make_record(id="sgr_poison", team="\ud800"))
    writer.submit(make_record(id="sgr_fine"))
    await wait_for(lambda: writer.problem is not None and "set aside" in writer.problem, "the writer to say so")
    await wait_for(lambda: count(engine) == 1, "the good record, written all the same")
    # Only the refused record is left (once the flush that wrote the good one has taken it off the queue).
    await wait_for(lambda: writer.pending == 1, "the queue to hold the refused record alone")
    blocked.unlink()
    await wait_for(lambda: writer.pending == 0, "the refused record to be set aside once the disk allows")
    assert writer.problem is None
    [aside] = blocked.glob("refused-*.jsonl")
    assert len(aside.read_text().splitlines()) == 1
    await writer.close()


def test_an_unwritable_ledger_makes_healthz_say_why(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, ledger_stall_seconds=0.5, max_pending_records=1) as stack:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE usage_records RENAME TO usage_records_gone"))
        try:
            response = httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key})
            assert response.status_code == 200
            # First the queue is full (its bound is 1), then the record has waited past the stall limit.
            wait_until(lambda: "waited" in httpx.get(f"{stack.url}/healthz").json().get("error", ""), "a stall")
            health = httpx.get(f"{stack.url}/healthz")
            assert health.status_code == 503 and health.json()["pending_records"] == 1
            assert httpx.get(f"{stack.url}/livez").status_code == 200
            # The queue is at its bound: a call spendgate could not record is a call it does not make.
            refused = httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key})
            assert (refused.status_code, refused.headers["x-spendgate-error"]) == (503, "ledger_unavailable")
            assert len(stack.upstream.requests) == 1
        finally:
            with engine.begin() as connection:
                connection.execute(text("ALTER TABLE usage_records_gone RENAME TO usage_records"))
        wait_until(lambda: httpx.get(f"{stack.url}/healthz").status_code == 200, "/healthz to recover")
        # The refusal is recorded too, once the ledger is back.
        assert [r["outcome"] for r in stack.records(2)] == ["ok", "rejected"]


def test_hostile_records_then_sigterm_then_a_clean_restart(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    hostile: list[bytes] = [
        json.dumps({**MESSAGE, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
        json.dumps({**MESSAGE, "model": "\ud800"}).encode(),
        json.dumps({**MESSAGE, "metadata": {"user_id": "\ud800\x00"}}).encode(),
        json.dumps({**MESSAGE, "max_tokens": 2**63}).encode(),
        json.dumps({**MESSAGE, "max_tokens": 2**31}).encode(),
        b'{"model":"claude-sonnet-4-6","max_tokens":10,"messages":' + b"[" * 900 + b"]" * 900 + b"}",
        json.dumps({**MESSAGE, "messages": [{"role": "user", "content": "\ud800" * 40_000}]}).encode(),
    ]
    upstream = FakeAnthropic()
    answered: list[str] = []
    with serve_in_thread(upstream) as upstream_url:
        with replica(db_url, upstream_url, tmp_path) as (url, process):
            headers = {b"x-api-key": key.encode(), b"content-type": b"application/json"}
            for n, body in enumerate([*hostile, *(json.dumps(MESSAGE).encode() for _ in range(10))]):
                extra = {b"x-spendgate-user": b"caf\xe9"} if n % 2 else {}
                response = httpx.post(f"{url}/v1/messages", content=body, headers={**headers, **extra}, timeout=30)
                assert response.status_code in (200, 400), (n, response.text)
                answered.append(response.headers["x-spendgate-request-id"])
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        # A restart on the same spill folder starts cleanly and replays whatever was left.
        with replica(db_url, upstream_url, tmp_path):
            pass
    written = records(engine)
    assert sorted(r["id"] for r in written) == sorted(answered)
    # One record per call the upstream saw, and those calls are exactly the ones answered 200.
    assert len([r for r in written if r["status"] == 200]) == len(upstream.requests)


@pytest.fixture
def budgeted_key(engine: Engine) -> Iterator[str]:
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(100)), actor="test")
    yield create_key(engine, "research", actor="test")[1]


def is_lease(record: dict[str, Any]) -> bool:
    return str(record["id"]).startswith(LEASE_PREFIX)


@pytest.mark.parametrize(
    "budget",
    [
        # Less than SMALL_BUDGET worst cases of MESSAGE (about $0.0005 each): every call takes its own hold.
        pytest.param(Decimal("0.012"), id="per-call-holds"),
        # Plenty: calls are admitted against the replicas' leases.
        pytest.param(Decimal(100), id="leases"),
    ],
)
def test_a_killed_replica_loses_nothing_and_leaves_no_hold(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal
) -> None:
    create_team(engine, "research", TeamSettings(budget_usd=budget), actor="test")
    _, budgeted_key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    calls = 16
    with serve_in_thread(upstream) as upstream_url:
        with (
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS) as (doomed, process),
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS) as (survivor, _),
        ):
            # Slow streams on both replicas: half are in flight on the one that dies.
            headers = {
                "x-api-key": budgeted_key,
                "x-fake-chunk": "200",
                "x-fake-delay": "0.3",
                "x-spendgate-feature": "triage",
                "x-claude-code-session-id": "fleet-session",
                "x-claude-code-agent-id": "agent-2",
            }

            def call(url: str) -> None:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"{url}/v1/messages", json={**MESSAGE, "stream": True}, headers=headers, timeout=60)

            threads = [threading.Thread(target=call, args=(doomed if n % 2 else survivor,)) for n in range(calls)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(upstream.requests) == calls, "every call to reach the upstream")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            for thread in threads:
                thread.join(timeout=60)
            # Without any restart, a live replica takes over the dead one's holds: each call's own hold becomes
            # its record, a lease becomes one record at the amount leased (the calls it covered may have been
            # billed; only the dead replica's journal knows them). The survivor's idle lease ends by itself.
            wait_until(lambda: count(engine, BudgetHold) == 0, "the dead replica's holds to be recorded")
            if budget == 100:
                wait_until(lambda: [r for r in records(engine) if is_lease(r)], "the dead replica's lease recorded")
            else:
                wait_until(lambda: count(engine) == calls, "a record for every call")
            interrupted = [r for r in records(engine) if r["outcome"] == "interrupted"]
            assert interrupted and {r["cost_source"] for r in interrupted} == {"estimate"}
            # A call's own hold keeps what its record needs, its tags included (a lease covers many calls).
            calls_held = {(r["feature"], r["session"], r["agent"]) for r in interrupted if not is_lease(r)}
            assert calls_held == (set() if budget == 100 else {("triage", "fleet-session", "agent-2")})
            assert get_team(engine, "research").reserved_usd == 0
            assert get_team(engine, "research").spent_usd <= budget
        # A restart on the same spill folder replays the dead replica's journal: nothing new, nothing twice, and
        # a lease recorded at its amount is corrected to nothing (every call it covered has its own record).
        with replica(db_url, upstream_url, tmp_path, env=HEARTBEATS):
            pass
    written = records(engine)
    leases = [r for r in written if is_lease(r)]
    assert {Decimal(r["cost_usd"]) for r in leases} <= {Decimal(0)}
    assert (budget == 100) == bool(leases)
    calls_written = [r for r in written if not is_lease(r)]
    assert len(calls_written) == len({r["id"] for r in calls_written}) == len(upstream.requests) == calls
    # Whoever wrote its record (the replica, the reaper from its hold, the replay from its journal), a call keeps
    # its session and agent.
    assert {(r["session"], r["agent"]) for r in calls_written} == {("fleet-session", "agent-2")}
    spent = sum((Decimal(r["cost_usd"]) for r in calls_written), Decimal(0))
    assert get_team(engine, "research").spent_usd == spent
    assert count(engine, Instance) == 0
    assert not list((tmp_path / "spill").glob("journal-*.jsonl"))
    # Estimates corrected from the journal are vouched for in the audit trail, which still verifies.
    assert verify(engine).problem is None


def test_a_hold_lives_as_long_as_its_call(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """A hold past its TTL is kept while its process beats: a long stream never frees budget mid-call."""
    team = TeamSettings(budget_usd=Decimal("0.05"))
    with running_stack(
        engine, db_url, tmp_path, team=team, reservation_ttl_seconds=0.2, reservation_sweep_seconds=0.1
    ) as stack:
        slow = {"x-api-key": stack.key, "x-fake-chunk": "100", "x-fake-delay": "0.2"}
        body = {**MESSAGE, "max_tokens": 2000, "stream": True}
        streaming = threading.Thread(
            target=httpx.post, args=(f"{stack.url}/v1/messages",), kwargs={"json": body, "headers": slow, "timeout": 60}
        )
        streaming.start()
        wait_until(lambda: stack.upstream.requests, "the stream to start")
        # Several sweeps past the TTL, mid-stream: the hold is still there, and still refuses what would overrun.
        wait_until(lambda: len(stack.upstream.requests) and streaming.is_alive() and _swept_past_ttl(stack), "sweeps")
        assert get_team(engine, "research").reserved_usd > 0
        second = httpx.post(f"{stack.url}/v1/messages", json=body, headers={"x-api-key": stack.key})
        assert second.status_code == 402
        streaming.join(timeout=60)
        stack.idle()
    view = get_team(engine, "research")
    assert view.reserved_usd == 0 and view.spent_usd <= Decimal("0.05")


def _swept_past_ttl(stack: Any) -> bool:
    """True once a hold is older than its TTL by several sweeps (read from the ledger, not the clock)."""
    with stack.engine.connect() as connection:
        expired = connection.execute(
            text("SELECT count(*) FROM budget_holds WHERE expires_at < :now"),
            {"now": _utc_naive_now() - timedelta(seconds=0.5)},
        ).scalar_one()
    return bool(expired)


def _utc_naive_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def test_a_ledger_outage_does_not_make_live_replicas_look_dead(
    engine: Engine, db_url: str, tmp_path: Path, budgeted_key: str
) -> None:
    """Every heartbeat is stale after an outage; no replica may take another's live calls for dead ones."""
    upstream = FakeAnthropic()
    with serve_in_thread(upstream) as upstream_url:
        with (
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS) as (first, _),
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS) as (second, _),
        ):
            headers = {"x-api-key": budgeted_key, "x-fake-chunk": "50", "x-fake-delay": "0.3"}

            def call(url: str) -> None:
                httpx.post(f"{url}/v1/messages", json={**MESSAGE, "stream": True}, headers=headers, timeout=60)

            threads = [threading.Thread(target=call, args=(url,)) for url in (first, second)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(upstream.requests) == 2, "both streams to start")
            # The heartbeats cannot be written (as in an outage) until both are older than the limit.
            with engine.begin() as connection:
                connection.execute(text("ALTER TABLE instances RENAME TO instances_gone"))
            try:
                wait_until(lambda: _stale(engine, seconds=2.5), "both heartbeats to go stale")
            finally:
                with engine.begin() as connection:
                    connection.execute(text("ALTER TABLE instances_gone RENAME TO instances"))
            for thread in threads:
                thread.join(timeout=60)
            wait_until(lambda: count(engine) == 2, "both records")
    assert [(r["outcome"], r["cost_source"]) for r in records(engine)] == [("ok", None), ("ok", None)]
    assert get_team(engine, "research").reserved_usd == 0


def _stale(engine: Engine, *, seconds: float) -> bool:
    """Whether every heartbeat in the renamed table is older than `seconds`."""
    cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=seconds)
    with engine.connect() as connection:
        fresh = connection.execute(
            text("SELECT count(*) FROM instances_gone WHERE heartbeat_at >= :cutoff"), {"cutoff": cutoff}
        )
        return bool(fresh.scalar_one() == 0)


def test_journal_replay_command_for_a_replica_that_will_not_come_back(
    engine: Engine, db_url: str, tmp_path: Path, budgeted_key: str
) -> None:
    """`spendgate journal replay DIR`: what a dead replica's journal holds becomes records, once."""
    journal = tmp_path / "dead-replica"
    key_id = records_key_id(engine)
    # A process that journals two calls, ends one, and dies without cleaning up (os._exit: no close, no drain).
    dying = f"""
import os, sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from proxy.ledger.journal import Journal, Start
from tests.test_writer import make_record
journal = Journal(Path({str(journal)!r}), "gone")
started = make_record().started_at
for call_id in ("sgr_unfinished", "sgr_finished"):
    journal.started(Start(id=call_id, started_at=started, team="research", key_id={key_id!r}, feature=None,
        user=None, endpoint="/v1/messages", model="claude-sonnet-4-6", streamed=True, max_tokens=1000,
        input_bound=500, held=None, metered=True))
journal.ended(make_record(id="sgr_finished", key_id={key_id!r}))
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", dying], check=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    [segment] = journal.glob("journal-gone.*.jsonl")
    with segment.open("a") as cut:
        cut.write('["s","sgr_cut_short')  # the line a power cut would leave half written
    # Twice: a second replay of the same folder finds nothing more to do.
    for _ in range(2):
        replayed = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "journal", "replay", str(journal), "--db", db_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert replayed.returncode == 0, replayed.stderr
    by_id = {r["id"]: r for r in records(engine)}
    assert sorted(by_id) == ["sgr_finished", "sgr_unfinished"]
    unfinished = by_id["sgr_unfinished"]
    assert (unfinished["outcome"], unfinished["cost_source"], unfinished["team"]) == (
        "interrupted",
        "estimate",
        "research",
    )
    # Its worst case: 500 input tokens at the dearest input rate and 1,000 output tokens of Sonnet 4.6.
    assert Decimal(unfinished["cost_usd"]) > Decimal("0.015")
    # The interrupted call's worst case is spent on its team (the finished record here carries no hold).
    # (In the period of the call, whatever the date the test runs on.)
    spent = get_team(engine, "research", now=make_record().started_at).spent_usd
    assert spent == Decimal(unfinished["cost_usd"])
    assert "unreadable line" in (journal / "refused-replay.jsonl").read_text()
    assert not list(journal.glob("journal-*"))


def records_key_id(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.execute(text("SELECT id FROM api_keys")).scalar_one())


def _journaled(workdir: Path) -> str:
    """Every line of a replica's crash journals."""
    return "".join(path.read_text() for path in (workdir / "spill").glob("journal-*.jsonl"))


def test_a_call_that_cannot_be_journaled_never_goes_out(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """With the journal's disk full and the ledger locked, calls are refused 503 instead of going out with their
    record in memory only (30 got 200 and, after a SIGKILL, left no record). Once the disk has room the calls go
    out again, the outage is logged as one failure and its recovery, and a SIGKILL while the ledger is still locked
    loses none of them."""
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    headers = {"x-api-key": key}
    with serve_in_thread(upstream) as upstream_url:
        with replica(db_url, upstream_url, tmp_path) as (url, process), ledger_locked(engine):
            # The serving process may grow no file: its journal's disk is full.
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            refused = [httpx.post(f"{url}/v1/messages", json=MESSAGE, headers=headers, timeout=60) for _ in range(30)]
            assert {(r.status_code, r.headers["x-spendgate-error"]) for r in refused} == {(503, "ledger_unavailable")}
            assert upstream.requests == []
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            ids = [f"req_sent_{n}" for n in range(5)]
            sent = [
                httpx.post(f"{url}/v1/messages", json=MESSAGE, headers={**headers, "x-fake-request-id": i}, timeout=60)
                for i in ids
            ]
            assert [r.status_code for r in sent] == [200] * 5
            # One line for the whole outage, not one per call refused (a storm of calls was a storm of lines).
            [log] = tmp_path.glob("serve-*.log")
            recovered = re.compile(r"writing the crash journal .* recovered after \d+ failed attempts")
            wait_until(lambda: recovered.search(log.read_text()) is not None, "the journal's recovery logged")
            # A call's end reaches its journal at the end of the event loop's turn after its answer: killed in
            # between, its record would be replayed as interrupted (an estimate), which is not what this proves.
            wait_until(lambda: all(i in _journaled(tmp_path) for i in ids), "the five calls' ends journaled")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        # The next process on the same spill folder replays the journal.
        with replica(db_url, upstream_url, tmp_path):
            pass
    forwarded = [r for r in records(engine) if r["status"] == 200]
    assert len(forwarded) == len(upstream.requests) == 5


@pytest.mark.parametrize("budget", [Decimal("0.01"), Decimal(100)], ids=["per-call-holds", "leases"])
def test_budgeted_calls_are_refused_in_bounded_time_while_the_ledger_is_locked(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal
) -> None:
    """Someone holds the ledger's write lock (a long transaction): budgeted calls get 503 `ledger_unavailable`
    after the ledger wait instead of hanging until the lock goes (they waited up to 30 s). The lock is held until
    every call has its answer, so a call that waited for the lock would fail the test. Once the lock goes, what
    landed late (a hold, a grant) is given back, and calls go out again."""
    team = TeamSettings(budget_usd=budget)
    with running_stack(engine, db_url, tmp_path, team=team, ledger_wait_seconds=0.5) as stack:
        answers: list[httpx.Response] = []

        def call() -> None:
            answers.append(httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key}))

        with ledger_locked(engine):
            threads = [threading.Thread(target=call) for _ in range(20)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(answers) == 20, "every call to be answered while the ledger is locked")
        assert {(a.status_code, a.headers["x-spendgate-error"]) for a in answers} == {(503, "ledger_unavailable")}
        assert stack.upstream.requests == []
        wait_until(lambda: get_team(engine, "research").reserved_usd == 0, "late holds and grants to be given back")
        answer = httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key})
        assert answer.status_code == 200


@pytest.mark.parametrize("budget", [Decimal("0.01"), Decimal(100)], ids=["per-call-holds", "leases"])
def test_what_a_call_gave_up_on_lands_before_the_proxy_stops(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal, caplog: pytest.LogCaptureFixture
) -> None:
    """A call whose wait for a locked ledger ran out leaves its hold or lease grant to land in the background. The
    proxy is stopped while that still waits: the stop waits for it (a hold is given back as it lands) before it
    ends its leases and retires. It used not to, and on PostgreSQL a grant landed after the leases had ended, held
    by a process that was gone for an hour (the reservation TTL)."""
    caplog.set_level(logging.INFO, logger="spendgate")
    stopped = contextlib.ExitStack()
    team = TeamSettings(budget_usd=budget)
    stack = stopped.enter_context(running_stack(engine, db_url, tmp_path, team=team, ledger_wait_seconds=0.5))
    # On PostgreSQL only the budget counters are locked, so that the refused call's record is written and nothing
    # but the exchange can hold the stop up.
    with ledger_locked(engine, tables=("budget_counters",)):
        answer = httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key})
        assert (answer.status_code, answer.headers["x-spendgate-error"]) == (503, "ledger_unavailable")
        stopping = threading.Thread(target=stopped.close)
        stopping.start()
        waiting = "ledger exchanges still running"
        wait_until(lambda: waiting in caplog.text or not stopping.is_alive(), "the stop to wait for the exchange")
        assert waiting in caplog.text
    stopping.join(timeout=60)
    assert not stopping.is_alive()
    # Every write queued for the ledger before this lock has committed once it is ours: a grant that had not
    # landed yet (a stop that did not wait for it) is in the ledger now.
    with ledger_locked(engine):
        pass
    assert get_team(engine, "research").reserved_usd == 0
    assert count(engine, BudgetHold) == 0
    assert stack.upstream.requests == []


@pytest.mark.skipif(POSTGRES_URL is None, reason="SQLite has one write lock: every write waits in one queue")
@pytest.mark.parametrize("budget", [Decimal("0.01"), Decimal(100)], ids=["per-call-holds", "leases"])
def test_what_a_call_gave_up_on_and_the_stop_could_not_wait_for_is_ended_by_the_next_start(
    engine: Engine, db_url: str, tmp_path: Path, budget: Decimal, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but the ledger stays locked for longer than the stop waits: the stop ends, the exchange still
    waiting. When it lands, a hold is given back by the exchange's own thread, and a lease grant is ended by the
    next start, which replays the journal the stop kept for it."""
    team = TeamSettings(budget_usd=budget)
    with ledger_locked(engine, tables=("budget_counters",)):
        waits = {"ledger_wait_seconds": 0.5, "record_drain_seconds": 0.5}
        with running_stack(engine, db_url, tmp_path, team=team, key_budget=None, **waits) as stack:
            answer = httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key})
            assert (answer.status_code, answer.headers["x-spendgate-error"]) == (503, "ledger_unavailable")
        assert "ledger exchanges were still running after 0.5 s: the journal is kept" in caplog.text
    with ledger_locked(engine):
        pass  # every write queued before this lock has landed
    with running_stack_again(engine, db_url, tmp_path, stack):
        pass
    assert get_team(engine, "research").reserved_usd == 0
    assert count(engine, BudgetHold) == 0


@pytest.mark.anyio
async def test_a_stop_cancelling_the_upkeep_lets_its_round_end_and_waits_for_it() -> None:
    """The stop cancels the lease upkeep. A round under way is not cut short: its ledger work would commit in its
    thread with nobody left to apply it in memory (a rate give-back counted twice). The stop's wait covers it."""
    started, go = threading.Event(), threading.Event()
    applied: list[str] = []

    async def upkeep_round() -> None:
        def exchange() -> None:
            started.set()
            go.wait(30)

        await anyio.to_thread.run_sync(exchange)
        applied.append("in memory")

    upkeep = asyncio.ensure_future(shielded(upkeep_round()))
    await anyio.to_thread.run_sync(started.wait)
    upkeep.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upkeep
    go.set()
    assert await outliving(30) == 0
    assert applied == ["in memory"]


def lease_holds(engine: Engine) -> list[tuple[str, Decimal]]:
    with engine.connect() as connection:
        query = select(BudgetHold.call_id, BudgetHold.amount_usd).where(BudgetHold.call_id.startswith(LEASE_PREFIX))
        return [(call_id, amount) for call_id, amount in connection.execute(query)]


def test_leases_a_clean_exit_cannot_end_stay_in_the_journal_until_a_replay_ends_them(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """The ledger does not answer as the proxy stops, so its budget leases stay in the ledger: the journal, which
    the next start replays to end them, is kept (it was deleted, leaving the leases to be recorded as spent)."""
    team = TeamSettings(budget_usd=Decimal(100))
    with contextlib.ExitStack() as later:
        with running_stack(engine, db_url, tmp_path, team=team) as stack:
            for _ in range(5):
                assert httpx.post(f"{stack.url}/v1/messages", json=MESSAGE, headers={"x-api-key": stack.key}).is_success
            stack.idle()
            assert lease_holds(engine)
            later.enter_context(table_gone(engine, "budget_holds"))
        assert list((tmp_path / "spill").glob("journal-*.jsonl"))
    assert lease_holds(engine)
    with running_stack_again(engine, db_url, tmp_path, stack) as again:
        wait_until(lambda: not lease_holds(engine), "the journal's replay ending the leases")
        assert len(again.records(5)) == 5
    costs = [Decimal(record["cost_usd"]) for record in records(engine)]
    assert get_team(engine, "research").spent_usd == sum(costs, Decimal(0))
