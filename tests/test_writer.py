"""The ledger writer: nothing lost, nothing written twice, nothing that stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, func, select

from proxy.config import WriterMode
from proxy.instruments import Metrics
from proxy.ledger.commit import insert_records
from proxy.ledger.counters import team_counter
from proxy.ledger.db import make_engine
from proxy.ledger.disk import encode, record_to_json, replay_spilled
from proxy.ledger.export import iter_usage
from proxy.ledger.schema import UsageRow
from proxy.ledger.teams import TeamSettings, create_team, get_team
from proxy.ledger.writer import Writer
from proxy.ledger.writes import InProcess, InThread, WriteFailed, usable_cores, writes_for
from proxy.types import Hold, Usage, UsageRecord
from tests.waiting import wait_for, wait_until

pytestmark = pytest.mark.anyio


def make_record(**fields: Any) -> UsageRecord:
    """A complete usage record; `fields` override the defaults."""
    base: dict[str, Any] = {
        "id": "sgr_test",
        "started_at": datetime(2026, 11, 20, 12, 0, tzinfo=UTC),
        "finished_at": datetime(2026, 11, 20, 12, 0, 1, tzinfo=UTC),
        "team": "research",
        "key_id": "key_1",
        "feature": None,
        "user": None,
        "endpoint": "/v1/messages",
        "model": "claude-sonnet-4-6",
        "response_model": "claude-sonnet-4-6",
        "upstream_request_id": "req_1",
        "status": 200,
        "outcome": "ok",
        "error_type": None,
        "streamed": False,
        "usage": Usage(input_tokens=100, output_tokens=10, cache_creation_1h_input_tokens=5),
        "cost_usd": Decimal("0.00045"),
        "price_version": "2026-09-01",
        "price_source": "table",
        "latency_ms": 12.5,
        "ttfb_ms": 3.25,
    }
    base.update(fields)
    return UsageRecord(**base)


def count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(UsageRow)).scalar_one())


def writer_for(engine: Engine, tmp_path: Path, mode: WriterMode = "thread", **overrides: Any) -> Writer:
    """A writer with quick flushes and small batches, its transactions in a thread or in a child process."""
    url = engine.url.render_as_string(hide_password=False)
    in_thread = InThread(engine)
    writes = overrides.pop("writes", None) or (InProcess(url, fallback=in_thread) if mode == "process" else in_thread)
    options: dict[str, Any] = {
        "flush_seconds": 0.01,
        "batch_size": 3,
        "drain_seconds": 0.2,
        "spill_dir": tmp_path / "spill",
        "instance": "test",
        "metrics": Metrics(),
    }
    options.update(overrides)
    return Writer(writes, **options)


def test_round_trip_is_exact(engine: Engine) -> None:
    insert_records(engine, [make_record(cost_usd=Decimal("0.000000123456789012"))])
    [(_, record)] = list(iter_usage(engine))
    assert record["cost_usd"] == "0.000000123456789012"
    assert record["started_at"] == "2026-11-20T12:00:00+00:00"
    assert (record["input_tokens"], record["cache_creation_1h_input_tokens"]) == (100, 5)


def test_same_id_is_written_once(engine: Engine) -> None:
    insert_records(engine, [make_record()])
    insert_records(engine, [make_record(), make_record(id="sgr_other")])
    assert count(engine) == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=5), max_size=20), st.integers(min_value=1, max_value=6))
def test_batch_results_read_again_are_counted_once(
    engine: Engine, tmp_path: Path, results: list[int], batch_size: int
) -> None:
    """A batch's results can come again (read twice, in one flush or in another): the ledger keeps each once and so
    does `/metrics` (it counted every read)."""
    metrics = Metrics()
    ids = [f"sgr_result_{uuid.uuid4().hex[:8]}_{n}" for n in range(6)]

    async def read() -> None:
        writer = writer_for(engine, tmp_path, batch_size=batch_size, metrics=metrics)
        writer.start()
        for n in results:
            writer.submit(make_record(id=ids[n], batch_id="msgbatch_x", custom_id=str(n)))
        await writer.close()

    anyio.run(read)
    written = {ids[n] for n in results}
    with engine.connect() as connection:
        rows = connection.execute(select(UsageRow.id).where(UsageRow.id.in_(ids))).scalars().all()
    assert sorted(rows) == sorted(written)
    calls = [s.value for f in metrics.registry.collect() for s in f.samples if s.name == "spendgate_calls_total"]
    assert sum(calls) == len(written)


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_batches_are_written_and_drained_on_close(engine: Engine, tmp_path: Path, mode: WriterMode) -> None:
    writer = writer_for(engine, tmp_path, mode)
    writer.start()
    for n in range(10):
        writer.submit(make_record(id=f"sgr_{n}"))
    await writer.close()
    assert count(engine) == 10
    assert writer.pending == 0


@pytest.mark.parametrize("mode", ["thread", "process"])
async def test_unreachable_ledger_spills_then_replays(engine: Engine, tmp_path: Path, mode: WriterMode) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}")
    writer = writer_for(broken, tmp_path, mode)
    writer.start()
    for n in range(5):
        writer.submit(make_record(id=f"sgr_{n}"))
    await writer.close()
    broken.dispose()
    assert writer.pending == 0
    [spilled] = list((tmp_path / "spill").iterdir())
    assert len(spilled.read_text().splitlines()) == 5
    assert replay_spilled(engine, tmp_path / "spill", name="test").written == 5
    assert list((tmp_path / "spill").iterdir()) == []
    exported = [record for _, record in iter_usage(engine)]
    assert [r["id"] for r in exported] == [f"sgr_{n}" for n in range(5)]
    assert exported[0]["cost_usd"] == "0.00045"


def test_replay_without_spill_dir_is_a_no_op(engine: Engine, tmp_path: Path) -> None:
    assert replay_spilled(engine, tmp_path / "nothing-here", name="test").written == 0


def test_a_truncated_spill_file_is_replayed_line_by_line(engine: Engine, tmp_path: Path) -> None:
    """A disk that filled up mid-write leaves a cut line: it is set aside with its reason, the rest is written."""
    spill = tmp_path / "spill"
    spill.mkdir()
    good = encode(record_to_json(make_record(id="sgr_good")))
    (spill / "unwritten-1-old.jsonl").write_text(good + "\n" + good.replace("sgr_good", "sgr_cut")[:40])
    done = replay_spilled(engine, spill, name="test")
    assert (done.written, done.set_aside) == (1, 1)
    [aside] = spill.glob("refused-*.jsonl")
    assert "unreadable line" in json.loads(aside.read_text())["error"]
    assert [r["id"] for _, r in iter_usage(engine)] == ["sgr_good"]
    assert not list(spill.glob("unwritten-*"))


async def test_a_killed_writer_process_is_replaced_and_nothing_is_lost_or_settled_twice(
    engine: Engine, tmp_path: Path
) -> None:
    """SIGKILL the writer's child while records stream in: a new child takes over, every record is written once,
    and the team's spend is the sum of its records (a batch the dead child committed is not settled again)."""
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(1000)), actor="test")
    counter = team_counter(1, "research", "month", Decimal(1000), make_record().started_at)
    writes = InProcess(engine.url.render_as_string(hide_password=False), fallback=InThread(engine))
    writer = writer_for(engine, tmp_path, writes=writes, batch_size=7)
    writer.start()
    killed: set[int] = set()
    for n in range(300):
        hold = Hold(call_id=f"sgr_{n}", counters=(counter,), amount=Decimal(0), held=False)
        writer.submit(make_record(id=f"sgr_{n}", cost_usd=Decimal("0.01"), hold=hold))
        if n % 100 == 50:
            await wait_for(lambda: count(engine) > 0, "some records written")
            pid = await child_of(writes)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        await anyio.lowlevel.checkpoint()
    await wait_for(lambda: writer.pending == 0, "every record written")
    assert writer.problem is None
    assert len(killed) == 3 and await child_of(writes) not in killed
    await writer.close()
    assert count(engine) == 300
    assert get_team(engine, "research", now=make_record().started_at).spent_usd == Decimal("3.00")


async def child_of(writes: InProcess) -> int:
    """The writer's child process, once a new one has replaced the one killed last (if it was not yet)."""
    try:
        return await writes.pid()
    except WriteFailed:  # the pool of the child killed last: replaced now
        return await writes.pid()


CHILD_OF_A_KILLED_PARENT = """
import asyncio, sys
from proxy.ledger.db import make_engine
from proxy.ledger.writes import InProcess, InThread

async def main():
    writes = InProcess(sys.argv[1], fallback=InThread(make_engine(sys.argv[1])))
    print(await writes.pid(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_the_writer_process_ends_with_its_parent(db_url: str) -> None:
    """A serving process killed outright leaves no writer behind holding a connection to the ledger."""
    with subprocess.Popen([sys.executable, "-c", CHILD_OF_A_KILLED_PARENT, db_url], stdout=subprocess.PIPE) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
    wait_until(lambda: not alive(child), "the writer process to exit")


NOWHERE_FOR_A_CHILD = """
import asyncio, sys, tempfile
from decimal import Decimal

# The fork server's socket goes in a temporary folder: with none to be had, no child can start.
tempfile.tempdir = sys.argv[2]
from proxy.ledger.db import make_engine
from proxy.ledger.writes import writes_for
from tests.test_writer import make_record

async def main():
    engine = make_engine(sys.argv[1])
    writes = writes_for(sys.argv[1], engine, "process", workers=1, soft_fraction=Decimal("0.8"))
    await writes.write([make_record(id="sgr_no_child")])
    print(writes.unavailable, flush=True)
    await writes.close()

asyncio.run(main())
"""


def test_records_are_written_from_a_thread_where_no_writer_process_can_start(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    """A read-only root file system leaves the fork server nowhere for its socket: the writer says so once and
    writes from a thread, rather than keep the records queued until the queue is full and calls are refused."""
    root = Path(__file__).resolve().parent.parent
    script = [sys.executable, "-c", NOWHERE_FOR_A_CHILD, db_url, str(tmp_path / "missing")]
    done = subprocess.run(script, cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "FileNotFoundError" in done.stdout
    assert "the ledger writer process could not start" in done.stderr and "writing from a thread" in done.stderr
    assert count(engine) == 1


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", ["auto", "process", "thread"])
def test_where_the_writes_run(engine: Engine, db_url: str, mode: WriterMode) -> None:
    """`auto` takes a child process only when the serving processes leave a core for it; an in-memory ledger,
    which a child could not open, is always written from a thread."""
    cores = usable_cores()
    for workers in sorted({1, cores}):
        writes = writes_for(db_url, engine, mode, workers=workers, soft_fraction=Decimal("0.8"))
        wanted = mode == "process" or (mode == "auto" and cores > workers)
        assert isinstance(writes, InProcess if wanted else InThread)
    memory = make_engine("sqlite://")
    assert isinstance(writes_for("sqlite://", memory, mode, workers=1, soft_fraction=Decimal("0.8")), InThread)
    memory.dispose()


def test_usable_cores_follow_the_affinity() -> None:
    pinned = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    pinned += "from proxy.ledger.writes import usable_cores; print(usable_cores())"
    assert subprocess.run([sys.executable, "-c", pinned], capture_output=True, text=True, check=True).stdout == "1\n"
