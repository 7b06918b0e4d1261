"""Logs: JSON lines when asked, and repeated failures logged when they start and end, not at every attempt."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from proxy.instruments import Metrics
from proxy.ledger.db import make_engine, upgrade
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from proxy.ledger.writer import Writer
from proxy.ledger.writes import InThread
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.test_writer import make_record
from tests.upstream import FakeAnthropic
from tests.waiting import wait_for


def test_json_logs_are_one_object_per_line_with_the_call(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    view, key = create_key(engine, "research", actor="test")
    message = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    with serve_in_thread(FakeAnthropic()) as upstream_url:
        with replica(db_url, upstream_url, tmp_path, env={"SPENDGATE_LOG_FORMAT": "json"}) as (url, _):
            answer = httpx.post(f"{url}/v1/messages", json=message, headers={"x-api-key": key})
            refused = httpx.post(f"{url}/v1/messages", json=message, headers={"x-api-key": "sk-wrong"})
    [log] = tmp_path.glob("serve-*.log")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    calls = {line["call_id"]: line for line in lines if "call_id" in line}
    ok = calls[answer.headers["x-spendgate-request-id"]]
    assert (ok["team"], ok["key_id"], ok["status"], ok["outcome"]) == ("research", view.id, 200, "ok")
    assert (ok["model"], ok["upstream_request_id"]) == ("claude-sonnet-4-6", "req_fake_0001")
    assert ok["cost_usd"] == answer.headers["x-spendgate-cost-usd"]
    assert 0 <= ok["added_ms"] <= ok["latency_ms"]
    bad = calls[refused.headers["x-spendgate-request-id"]]
    assert (bad["status"], bad["outcome"], bad["error_type"], bad["team"]) == (401, "rejected", "invalid_key", None)


@pytest.mark.anyio
async def test_a_ledger_outage_is_logged_when_it_starts_and_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = tmp_path / "healthy.db"
    upgrade(f"sqlite:///{healthy}")
    missing = tmp_path / "later"
    broken = make_engine(f"sqlite:///{missing / 'ledger.db'}")
    metrics = Metrics()
    writer = Writer(
        InThread(broken),
        flush_seconds=0.01,
        batch_size=3,
        drain_seconds=5,
        spill_dir=tmp_path / "spill",
        instance="t",
        metrics=metrics,
    )
    caplog.set_level(logging.INFO, logger="spendgate")
    writer.start()
    writer.submit(make_record(id="sgr_outage"))
    await wait_for(
        lambda: (metrics.registry.get_sample_value("spendgate_ledger_write_errors_total") or 0) >= 4,
        "four failed writes",
    )
    # The ledger comes back: a migrated database appears where the writer looks.
    missing.mkdir()
    healthy.rename(missing / "ledger.db")
    await wait_for(lambda: writer.pending == 0, "the queued record written")
    await writer.close()
    broken.dispose()
    lines = [r.getMessage() for r in caplog.records if "writing usage records" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "failed" in lines[0] and "recovered after" in lines[1]
