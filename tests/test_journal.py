"""The crash journal on its own: lines survive segment changes, and a replay finds every call."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine

from proxy.ledger import journal as journal_module
from proxy.ledger.commit import insert_records
from proxy.ledger.export import iter_usage
from proxy.ledger.journal import Journal, Start
from proxy.ledger.journal_replay import replay_journal
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from proxy.pricing.table import PriceTable
from proxy.types import UsageRecord
from tests.test_writer import make_record

NOW = datetime.now(UTC)


def start(n: int) -> Start:
    return Start(
        id=f"sgr_{n:024d}",
        started_at=NOW,
        team="research",
        key_id=None,
        feature=None,
        user=None,
        endpoint="/v1/messages",
        model="claude-sonnet-4-6",
        streamed=False,
        max_tokens=100,
        input_bound=500,
        held=Decimal("0.01"),
        metered=True,
    )


@pytest.mark.parametrize("segment_bytes", [1_000, 8 * 1024 * 1024], ids=["tiny-segments", "one-segment"])
def test_a_replay_finds_every_call_whatever_the_segments(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segment_bytes: int
) -> None:
    """50 calls: 20 recorded, 10 ended but not yet in the ledger, 20 still running when the process dies."""
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", segment_bytes)
    journal = Journal(tmp_path, "dead")
    records = [make_record(id=start(n).id, started_at=NOW) for n in range(30)]
    for n in range(50):
        journal.started(start(n))
        if n >= 2 and n - 2 < 30:
            journal.ended(records[n - 2])  # ends arrive while other calls start
    insert_records(engine, records[:20])
    journal.committed(records[:20])
    segments = len(list(tmp_path.glob("journal-dead.*.jsonl")))
    assert (segments > 1) == (segment_bytes == 1_000)

    replay_journal(engine, tmp_path, "dead", PriceTable.load(None), name="test")
    written = {record["id"]: record for _, record in iter_usage(engine)}
    assert sorted(written) == sorted(start(n).id for n in range(50))
    assert [written[start(n).id]["outcome"] for n in range(50)] == ["ok"] * 30 + ["interrupted"] * 20
    assert {written[start(n).id]["cost_usd"] for n in range(30, 50)} == {"0.01"}


EXAMPLES = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(["start", "end", "commit"]), min_size=1, max_size=80))
def test_no_call_is_lost_whatever_the_order(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: list[str]
) -> None:
    """Any interleaving of calls starting, ending and being written, with segments of a few lines each: a replay
    after the process dies gives every call that started exactly one record."""
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 700)
    example = next(EXAMPLES)
    directory = tmp_path / str(example)
    journal = Journal(directory, "dead")
    started: list[Start] = []
    ended: list[UsageRecord] = []
    written = 0
    for step in steps:
        if step == "start":
            started.append(start(len(started))._replace(id=f"sgr_{example:08d}{len(started):016d}"))
            journal.started(started[-1])
        elif step == "end" and len(ended) < len(started):
            ended.append(make_record(id=started[len(ended)].id, started_at=NOW))
            journal.ended(ended[-1])
        elif step == "commit" and written < len(ended):
            insert_records(engine, ended[written:])
            journal.committed(ended[written:])
            written = len(ended)
    replay_journal(engine, directory, "dead", PriceTable.load(None), name="test")
    mine = [r for _, r in iter_usage(engine) if r["id"].startswith(f"sgr_{example:08d}")]
    assert sorted(r["id"] for r in mine) == sorted(s.id for s in started)
    outcomes = {r["id"]: r["outcome"] for r in mine}
    assert [outcomes[s.id] for s in started] == ["ok"] * len(ended) + ["interrupted"] * (len(started) - len(ended))


def test_a_replay_reports_the_soft_limits_its_records_cross(engine: Engine, tmp_path: Path) -> None:
    """A dead process's unfinished call, recorded at its hold by the replay, can cross a soft limit: the replay
    says so, for its caller to alert (it was dropped before)."""
    create_team(engine, "research", TeamSettings(budget_usd=Decimal("0.0125")), actor="test")
    view, _ = create_key(engine, "research", actor="test")
    journal = Journal(tmp_path, "dead")
    journal.started(start(1)._replace(key_id=view.id))
    replayed = replay_journal(engine, tmp_path, "dead", PriceTable.load(None), name="test")
    assert [(alert.label, alert.spent_usd) for alert in replayed.crossed] == [("team research", Decimal("0.01"))]
