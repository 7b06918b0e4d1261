"""Repricing after a price correction: new costs beside the originals, vouched for in the audit trail."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from proxy.cli.main import main
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.counters import team_counter
from proxy.ledger.reprice import reprice
from proxy.ledger.teams import TeamSettings, create_team, get_team
from proxy.pricing.table import PriceTable
from proxy.types import Hold, Usage
from tests.test_writer import make_record

NOW = datetime.now(UTC)
# Sonnet 4.6 input corrected from $3 to $4 per MTok.
CORRECTION = """
[[version]]
id = "2026-09-01"
[version.models.claude-sonnet-4-6]
input = 4
output = 15
cache_write_5m = 5
cache_write_1h = 8
cache_read = 0.40
batch_input = 2
batch_output = 7.50
"""


@pytest.fixture
def corrected(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(CORRECTION)
    return path


def fill(engine: Engine) -> None:
    team = create_team(engine, "research", TeamSettings(budget_usd=Decimal(10)), actor="test")
    counter = team_counter(1, team.name, "month", Decimal(10), NOW)
    hold = Hold(call_id="none", counters=(counter,), amount=Decimal(0), held=False)
    insert_records(
        engine,
        [
            # 100,000 in + 10,000 out: $0.45 at $3/$15, $0.55 at $4/$15.
            make_record(
                id="sgr_1",
                team="research",
                started_at=NOW,
                hold=hold,
                usage=Usage(input_tokens=100_000, output_tokens=10_000),
                cost_usd=Decimal("0.45"),
            ),
            # Nothing to correct: an error with no usage.
            make_record(
                id="sgr_2",
                team="research",
                started_at=NOW,
                hold=hold,
                usage=Usage(),
                cost_usd=Decimal(0),
                status=429,
            ),
        ],
    )


def test_reprice_keeps_the_original_and_is_audited(
    engine: Engine, db_url: str, corrected: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(engine)
    assert get_team(engine, "research").spent_usd == Decimal("0.45")
    monkeypatch.setenv("SPENDGATE_PRICES", str(corrected))
    assert main(["reprice", "--since", NOW.date().isoformat(), "--db", db_url]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "examined": 2,
        "changed": 1,
        "cost_before_usd": "0.45",
        "cost_after_usd": "0.55",
        "audit_entry": 4,
    }
    assert main(["usage", "--db", db_url]) == 0
    records = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert (records["sgr_1"]["cost_usd"], records["sgr_1"]["repriced_from_cost_usd"]) == ("0.55", "0.45")
    assert records["sgr_2"]["repriced_from_cost_usd"] is None
    assert get_team(engine, "research").spent_usd == Decimal("0.55")
    assert main(["audit", "export", "--db", db_url]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["action"] == "usage.reprice"
    assert (events[-1]["before"]["cost_usd"], events[-1]["after"]["changed"]) == ("0.45", 1)
    assert verify(engine).problem is None
    # A second run with the same table finds nothing left to change.
    assert reprice(engine, PriceTable.load(corrected), since=NOW, until=None, actor="t").changed == 0


@pytest.mark.parametrize(
    "tamper, problem",
    [
        pytest.param(
            "UPDATE usage_records SET repriced_cost_usd = '0.01' WHERE id = 'sgr_1'",
            "usage record sgr_1 carries a corrected cost no reprice event vouches for",
            id="edited-correction",
        ),
        pytest.param(
            "UPDATE reprice_entries SET cost_usd = '0.01'",
            "the corrections of reprice event at entry 4 were altered",
            id="edited-entry",
        ),
    ],
)
def test_tampered_corrections_are_caught(engine: Engine, corrected: Path, tamper: str, problem: str) -> None:
    fill(engine)
    reprice(engine, PriceTable.load(corrected), since=NOW, until=None, actor="t")
    with engine.begin() as connection:
        connection.execute(text(tamper))
    assert verify(engine).problem == problem
