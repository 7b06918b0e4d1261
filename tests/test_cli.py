"""The `spendgate` CLI, run for real against a per-test ledger: exit codes, output, and what lands in the database."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import Engine, select

from proxy.cli import main
from proxy.keys import hash_key
from proxy.models import APIKey
from proxy.pricing import PriceTable


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spendgate(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script in a child process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_key_is_printed_alone_on_the_last_line_and_stored_hashed(db_url: str, engine: Engine) -> None:
    assert spendgate("teams", "create", "research", "--db", db_url).returncode == 0
    created = spendgate("keys", "create", "--team", "research", "--name", "ci", "--db", db_url)
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert key.startswith("sk-sg-") and len(key) > 40
    with engine.connect() as connection:
        stored = connection.execute(select(APIKey.key_hash, APIKey.name)).one()
    assert stored == (hash_key(key), "ci")
    assert key not in created.stderr


def test_errors_are_one_line_and_nonzero(db_url: str) -> None:
    result = spendgate("keys", "create", "--team", "nobody", "--db", db_url)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert "no team named 'nobody'" in result.stderr


def test_db_upgrade_is_idempotent(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "db", "upgrade", "--db", db_url)[0] == 0
    assert run(capsys, "db", "upgrade", "--db", db_url)[0] == 0


def test_team_create_update_list(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        *("teams", "create", "research", "--budget", "250.50", "--period", "week", "--models", "claude-sonnet-4-6"),
        *("--max-output-tokens", "4096", "--cap-policy", "reject", "--db", db_url),
    )
    assert code == 0
    created = json.loads(out)
    assert created["budget_usd"] == "250.50"
    assert created["models"] == ["claude-sonnet-4-6"]
    # Options not given keep their value; 'none' clears a limit.
    code, out, _ = run(capsys, "teams", "update", "research", "--max-output-tokens", "none", "--db", db_url)
    updated = json.loads(out)
    assert (updated["budget_usd"], updated["period"], updated["max_output_tokens"]) == ("250.50", "week", None)
    assert updated["cap_policy"] == "reject"
    code, out, _ = run(capsys, "teams", "list", "--format", "json", "--db", db_url)
    [listed] = json.loads(out)
    assert listed["spent_usd"] == "0"
    assert listed["remaining_usd"] == "250.50"
    code, out, _ = run(capsys, "teams", "list", "--db", db_url)
    assert out.splitlines()[0].split()[:4] == ["name", "budget_usd", "period", "spent_usd"]
    assert out.splitlines()[1].split()[:3] == ["research", "250.50", "week"]


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(("--budget", "lots"), "not an amount in USD", id="budget"),
        pytest.param(("--budget", "-5"), "not an amount in USD", id="negative-budget"),
        pytest.param(("--max-output-tokens", "0"), "not a positive whole number", id="cap"),
        pytest.param(("--models", ","), "at least one model", id="models"),
    ],
)
def test_bad_team_options_are_refused(
    db_url: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, _, err = run(capsys, "teams", "create", "research", *argv, "--db", db_url)
    assert code == 1
    assert message in err


def test_duplicate_team_is_refused(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "teams", "create", "research", "--db", db_url)[0] == 0
    code, _, err = run(capsys, "teams", "create", "research", "--db", db_url)
    assert code == 1
    assert "already exists" in err


def test_keys_list_and_revoke(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "teams", "create", "research", "--db", db_url)
    _, out, _ = run(capsys, "keys", "create", "--team", "research", "--budget", "10", "--db", db_url)
    key_id = out.split()[2]
    key = out.splitlines()[-1]
    _, out, _ = run(capsys, "keys", "list", "--team", "research", "--format", "json", "--db", db_url)
    [listed] = json.loads(out)
    assert (listed["id"], listed["budget_usd"], listed["revoked_at"]) == (key_id, "10", None)
    assert key not in out
    assert run(capsys, "keys", "revoke", key_id, "--db", db_url)[0] == 0
    _, out, _ = run(capsys, "keys", "list", "--format", "json", "--db", db_url)
    assert json.loads(out)[0]["revoked_at"] is not None
    code, _, err = run(capsys, "keys", "revoke", "key_missing", "--db", db_url)
    assert code == 1 and "no key" in err


def test_usage_export_jsonl_and_csv(db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.ledger.commit import insert_records
    from tests.test_writer import make_record

    insert_records(
        engine,
        [
            make_record(id="sgr_1", team="a", cost_usd=Decimal("0.000555")),
            make_record(id="sgr_2", team="b", cost_usd=Decimal("12.5")),
        ],
    )
    _, out, _ = run(capsys, "usage", "--db", db_url)
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["cost_usd"]) for r in records] == [("sgr_1", "0.000555"), ("sgr_2", "12.5")]
    _, out, _ = run(capsys, "usage", "--team", "b", "--format", "csv", "--db", db_url)
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert (row["id"], row["team"], row["cost_usd"]) == ("sgr_2", "b", "12.5")
    _, out, _ = run(capsys, "usage", "--since", "2999-01-01", "--db", db_url)
    assert out == ""
    code, _, err = run(capsys, "usage", "--since", "yesterday", "--db", db_url)
    assert code == 1 and "ISO 8601" in err


def test_prices_shows_version_and_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "--model", "claude-sonnet-4-6")
    assert code == 0
    assert "claude-sonnet-4-6" in out
    assert f"price version {PriceTable.load().version_at(datetime.now(UTC))} " in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: spendgate" in capsys.readouterr().err


def test_prices_check_lists_models_the_table_could_not_price(
    db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime

    from proxy.ledger.commit import insert_records
    from tests.test_writer import make_record

    at = datetime(2026, 11, 20, 12, tzinfo=UTC)
    insert_records(engine, [make_record(id="sgr_ok", started_at=at)])
    assert run(capsys, "prices", "check", "--db", db_url)[:2] == (
        0,
        "every call in the period was priced from the table\n",
    )
    insert_records(
        engine,
        [
            make_record(id="sgr_f1", started_at=at, response_model="claude-sonnet-9-9", price_source="family"),
            make_record(id="sgr_f2", started_at=at, response_model="claude-sonnet-9-9", price_source="family"),
            make_record(id="sgr_u", started_at=at, response_model="gpt-4o", price_source="unpriced", cost_usd=None),
        ],
    )
    code, out, _ = run(capsys, "prices", "check", "--db", db_url, "--since", "2026-11-01", "--format", "json")
    assert code == 4
    assert [(f["model"], f["price_source"], f["calls"]) for f in json.loads(out)] == [
        ("claude-sonnet-9-9", "family", 2),
        ("gpt-4o", "unpriced", 1),
    ]
    assert run(capsys, "prices", "check", "--db", db_url, "--since", "2026-11-21")[0] == 0
    [total] = json.loads(run(capsys, "report", "--db", db_url, "--format", "json")[1])
    assert (total["family_priced_calls"], total["unpriced_calls"]) == (2, 1)


def test_usage_csv_cells_never_run_as_formulas(db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.ledger.commit import insert_records
    from tests.test_writer import make_record

    insert_records(engine, [make_record(id="sgr_x", feature='=HYPERLINK("http://evil")', user="@user")])
    code, out, _ = run(capsys, "usage", "--format", "csv", "--db", db_url)
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and (row["feature"], row["user"]) == ('\'=HYPERLINK("http://evil")', "'@user")
