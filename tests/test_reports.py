"""Reports: totals equal the sum of the records, grouped as asked; savings and retry shares by hand."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from proxy.cli.main import main
from proxy.ledger.commit import insert_records
from proxy.ledger.reports import report
from proxy.pricing.table import PriceTable
from proxy.types import Usage
from tests.test_writer import make_record

DAY1 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 21, 23, 59, tzinfo=UTC)
PRICES = PriceTable.load()


@pytest.fixture
def ledger(engine: Engine) -> Engine:
    insert_records(
        engine,
        [
            make_record(
                id="r1",
                team="a",
                started_at=DAY1,
                usage=Usage(input_tokens=100_000, output_tokens=10_000),
                cost_usd=Decimal("0.45"),
            ),
            # A retry that read 1M tokens from cache: saved 1M × ($3 − $0.30) per MTok = $2.70.
            make_record(
                id="r2",
                team="a",
                started_at=DAY1,
                is_retry=True,
                retry_reason="sdk",
                usage=Usage(cache_read_input_tokens=1_000_000),
                cost_usd=Decimal("0.3"),
            ),
            # A 5-minute cache write of 1M tokens cost $0.75 more than plain input.
            make_record(
                id="r3",
                team="a",
                started_at=DAY2,
                feature="search",
                usage=Usage(cache_creation_5m_input_tokens=1_000_000),
                cost_usd=Decimal("3.75"),
            ),
            make_record(
                id="r4",
                team="b",
                started_at=DAY2,
                model="gpt-9",
                response_model="gpt-9",
                cost_usd=None,
                price_source="unpriced",
            ),
            # Batch halves the tokens: $0.225 paid means $0.225 saved.
            make_record(
                id="r5",
                team="b",
                started_at=DAY2,
                usage=Usage(input_tokens=100_000, output_tokens=10_000, service_tier="batch"),
                cost_usd=Decimal("0.225"),
            ),
        ],
    )
    return engine


def test_totals_by_team(ledger: Engine) -> None:
    rows = {row.group["team"]: row.to_json() for row in report(ledger, PRICES, by=["team"])}
    assert rows["a"]["calls"] == 3
    assert rows["a"]["cost_usd"] == "4.5"
    assert (rows["a"]["retries"], rows["a"]["retry_cost_usd"], rows["a"]["retry_share"]) == (1, "0.3", "0.0667")
    assert rows["a"]["input_tokens"] == 100_000
    assert rows["a"]["cache_read_input_tokens"] == 1_000_000
    assert rows["a"]["cache_savings_usd"] == "1.95"
    assert rows["b"]["calls"] == 2
    assert rows["b"]["cost_usd"] == "0.225"
    assert rows["b"]["unpriced_calls"] == 1
    assert rows["b"]["batch_savings_usd"] == "0.225"


def test_totals_equal_the_records(ledger: Engine) -> None:
    [total] = report(ledger, PRICES, by=[])
    assert total.calls == 5
    assert total.cost_usd == Decimal("0.45") + Decimal("0.3") + Decimal("3.75") + Decimal("0.225")
    by_day_and_team = report(ledger, PRICES, by=["day", "team"])
    assert [(row.group["day"], row.group["team"], row.calls) for row in by_day_and_team] == [
        ("2026-11-20", "a", 2),
        ("2026-11-21", "a", 1),
        ("2026-11-21", "b", 2),
    ]
    assert sum((row.cost_usd for row in by_day_and_team), Decimal(0)) == total.cost_usd


def test_since_until_and_feature(ledger: Engine) -> None:
    rows = report(ledger, PRICES, by=["feature"], since=DAY2)
    assert [(row.group["feature"], row.calls) for row in rows] == [(None, 2), ("search", 1)]
    assert report(ledger, PRICES, by=["team"], until=DAY1)[:1] == []


def test_unknown_group_is_refused(ledger: Engine) -> None:
    with pytest.raises(ValueError, match="cannot group by colour"):
        report(ledger, PRICES, by=["colour"])


def test_cli_formats(ledger: Engine, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--by", "team,model", "--format", "json", "--db", db_url]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["team"], r["model"], r["cost_usd"]) for r in rows] == [
        ("a", "claude-sonnet-4-6", "4.5"),
        ("b", "claude-sonnet-4-6", "0.225"),
        ("b", "gpt-9", "0"),
    ]
    assert main(["report", "--by", "key", "--format", "csv", "--db", db_url]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["key"], row["calls"], row["cost_usd"]) == ("key_1", "5", "4.725")
    assert main(["report", "--by", "user", "--db", db_url]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["user", "calls", "input_tokens"]
    assert main(["report", "--by", "colour", "--db", db_url]) == 1


def test_cli_pages(ledger: Engine, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--limit` prints a page and the next page's `--cursor` on stderr; following the cursors prints the whole
    report once; a cursor of another report, or a limit that is not a positive whole number, exits 1."""
    assert main(["report", "--by", "team,model", "--format", "json", "--db", db_url]) == 0
    whole = json.loads(capsys.readouterr().out)
    seen: list[dict[str, str]] = []
    more = ["--limit", "2"]
    while True:
        assert main(["report", "--by", "team,model", "--format", "json", *more, "--db", db_url]) == 0
        out, err = capsys.readouterr()
        seen += json.loads(out)
        if not err:
            break
        more = ["--limit", "2", "--cursor", err.split("--cursor ")[1].strip()]
    assert seen == whole and len(whole) == 3
    assert main(["report", "--by", "team", "--cursor", more[-1], "--db", db_url]) == 1
    assert "'cursor' is not one this report returned" in capsys.readouterr().err
    for limit in ("0", "-1", "two", "²", "1001", "9" * 30):
        assert main(["report", "--by", "team", "--limit", limit, "--db", db_url]) == 1
