"""The ledger writer: nothing lost, nothing written twice, nothing that stops it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from proxy.db import make_engine
from proxy.export import iter_usage
from proxy.ledger.commit import insert_records
from proxy.ledger.disk import encode, record_to_json, replay_spilled
from proxy.ledger.writer import Writer
from proxy.metrics import Metrics
from proxy.models import UsageRow
from proxy.types import Usage, UsageRecord

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


def writer_for(engine: Engine, tmp_path: Path, **overrides: Any) -> Writer:
    options: dict[str, Any] = {
        "flush_seconds": 0.01,
        "batch_size": 3,
        "drain_seconds": 0.2,
        "spill_dir": tmp_path / "spill",
        "instance": "test",
        "metrics": Metrics(),
    }
    options.update(overrides)
    return Writer(engine, **options)


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


async def test_batches_are_written_and_drained_on_close(engine: Engine, tmp_path: Path) -> None:
    writer = writer_for(engine, tmp_path)
    writer.start()
    for n in range(10):
        writer.submit(make_record(id=f"sgr_{n}"))
    await writer.close()
    assert count(engine) == 10
    assert writer.pending == 0


async def test_unreachable_ledger_spills_then_replays(engine: Engine, tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}")
    writer = writer_for(broken, tmp_path)
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
