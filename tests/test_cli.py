"""The `spendgate` CLI, run for real against a per-test ledger: exit codes, output, and what lands in the database."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, select

from proxy.cli.main import main
from proxy.ledger.keys import hash_key
from proxy.ledger.schema import APIKey
from proxy.pricing.table import PriceTable


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
    # Tables drop trailing zeros; JSON (above) keeps the amount as given.
    assert out.splitlines()[1].split()[:3] == ["research", "250.5", "week"]


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
    assert run(capsys, "teams", "create", "b", "--db", db_url)[0] == 0
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


def test_tables_show_money_exactly_without_padding(
    db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.ledger.commit import insert_records
    from tests.test_writer import make_record

    now = datetime.now(UTC)
    run(capsys, "teams", "create", "research", "--budget", "250.500", "--db", db_url)
    insert_records(
        engine,
        [
            make_record(id="sgr_1", user="ann", started_at=now, finished_at=now, cost_usd=Decimal("12.340000")),
            make_record(id="sgr_2", user="bob", started_at=now, finished_at=now, cost_usd=Decimal("0.000001875")),
        ],
    )
    _, out, _ = run(capsys, "teams", "list", "--db", db_url)
    assert table(out)[0] == {
        "name": "research",
        "budget_usd": "250.5",
        "period": "month",
        "spent_usd": "0",
        "held_usd": "0",
        "remaining_usd": "250.5",
        "windows": "monthly:0/250.5",
        "max_output_tokens": "-",
    }
    _, out, _ = run(capsys, "teams", "users", "research", "--db", db_url)
    assert [(row["user"], row["spent_usd"], row["held_usd"]) for row in table(out)] == [
        ("ann", "12.34", "0"),
        ("bob", "0.000001875", "0"),
    ]
    _, out, _ = run(capsys, "report", "--by", "team", "--db", db_url)
    assert table(out)[0]["cost_usd"] == "12.340001875"
    # JSON carries the ledger's exact decimal text, under the admin API's field names.
    _, out, _ = run(capsys, "teams", "users", "research", "--format", "json", "--db", db_url)
    ann = json.loads(out)[0]
    assert (ann["spent_usd"], ann["reserved_usd"]) == ("12.340000", "0")
    [team] = json.loads(run(capsys, "teams", "list", "--format", "json", "--db", db_url)[1])
    assert (team["budget_usd"], team["reserved_usd"]) == ("250.500", "0")


def table(out: str) -> list[dict[str, str]]:
    """The rows of a table the CLI printed, by column (cells hold no spaces here)."""
    header, *rows = [line.split() for line in out.splitlines()]
    return [dict(zip(header, row, strict=True)) for row in rows]


# What must never reach a terminal raw: C0 (newline is the output's own line structure), DEL, C1, and the Unicode
# marks that reorder or break the text around them (bidi embeddings, overrides and isolates; line separators).
FORBIDDEN = frozenset(
    chr(code)
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029)
    + (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
) - {"\n"}
HOSTILE_TEXT = st.text(
    st.sampled_from([*sorted(FORBIDDEN), "\n", "\\", '"', ",", "=", "+", "-", "@", "'"]) | st.characters()
)
# A second of its own for each example's record.
SECONDS = itertools.count()


def unescaped(cell: str) -> str:
    """The text a CSV or table cell stands for: its escapes read back (`\\x1b`, `\\u202e`, `\\\\`, ...)."""
    return cell.encode("latin-1", "backslashreplace").decode("unicode_escape")


@pytest.mark.parametrize(
    "user, shown",
    [
        pytest.param("\x1b]52;c;ZXZpbA==\x07", "\\x1b]52;c;ZXZpbA==\\x07", id="osc52-clipboard"),
        pytest.param("\x1b[2J\x1b[Hadmin", "\\x1b[2J\\x1b[Hadmin", id="clear-screen"),
        pytest.param("mallory\rroot", "mallory\\rroot", id="carriage-return"),
        pytest.param("a\nb\tc", "a\\nb\\tc", id="newline-tab"),
        pytest.param("\x9b31m", "\\x9b31m", id="c1-csi"),
        pytest.param("evil\u202egpj.exe", "evil\\u202egpj.exe", id="bidi-override"),
        pytest.param("C:\\x1b", "C:\\\\x1b", id="backslash"),
        pytest.param("zoë 🦊", "zoë 🦊", id="printable-unicode"),
    ],
)
def test_tables_show_control_characters_escaped(
    db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str], user: str, shown: str
) -> None:
    from proxy.ledger.commit import insert_records
    from proxy.ledger.teams import TeamSettings, create_team
    from tests.test_writer import make_record

    create_team(engine, "research", TeamSettings(), actor="test")
    insert_records(engine, [make_record(id="sgr_1", user=user, feature=user, started_at=datetime.now(UTC))])
    code, out, _ = run(capsys, "teams", "users", "research", "--db", db_url)
    assert code == 0 and out.splitlines()[1].split("  ")[0] == shown
    code, out, _ = run(capsys, "report", "--by", "feature", "--db", db_url)
    assert code == 0 and out.splitlines()[1].split("  ")[0] == shown


@pytest.mark.any_dialect
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=HOSTILE_TEXT)
def test_no_output_lets_a_control_character_reach_the_terminal(
    db_url: str, engine: Engine, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Whatever a client sends as its user id or feature, or an upstream as a model name, every table and CSV shows
    it on its own line with its control characters escaped (the CSV reads back to exactly the text stored); JSON
    escapes them itself."""
    from proxy.gateway.call import label
    from proxy.ledger.commit import insert_records
    from proxy.ledger.teams import TeamSettings, create_team
    from tests.test_writer import make_record

    # Each example on its own team and second, so that it sees only its own record.
    team = f"t{uuid.uuid4().hex}"
    create_team(engine, team, TeamSettings(period="total"), actor="test")
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=next(SECONDS))
    stored = label(text, 256)
    record = make_record(
        id=f"sgr_{team}", team=team, user=stored, feature=stored, model=stored, response_model=stored, started_at=at
    )
    insert_records(engine, [record])
    period = ("--since", at.isoformat(), "--until", (at + timedelta(seconds=1)).isoformat())
    for argv in (
        ("teams", "users", team),
        ("report", "--by", "user,feature,model", *period),
        ("report", "--by", "user,feature,model", "--format", "csv", *period),
        ("usage", "--team", team, "--format", "csv"),
    ):
        code, out, err = run(capsys, *argv, "--db", db_url)
        assert code == 0, err
        assert not FORBIDDEN & set(out), argv
        assert len(out.splitlines()) == 2, argv  # the header and one line for the record
    [row] = csv.DictReader(io.StringIO(out))
    for name in ("user", "feature", "model"):
        cell = row[name]
        if cell.startswith("'") and stored[:1] in ("=", "+", "-", "@"):
            cell = cell[1:]  # OWASP's guard: a formula start gets a leading quote
        assert unescaped(cell) == stored, name
    code, out, _ = run(capsys, "usage", "--team", team, "--db", db_url)
    assert code == 0 and not FORBIDDEN & set(out) and json.loads(out)["user"] == stored
    code, out, _ = run(capsys, "teams", "users", team, "--format", "json", "--db", db_url)
    assert code == 0 and not FORBIDDEN & set(out) and json.loads(out)[0]["user"] == stored


def test_groups_expiring_keys_and_rotation_from_the_command_line(
    capsys: pytest.CaptureFixture[str], db_url: str, engine: Engine
) -> None:
    assert run(capsys, "teams", "create", "eng", "--db", db_url)[0] == 0
    for _ in range(2):  # mapping twice is one mapping
        code, out, _ = run(capsys, "teams", "map-group", "eng", "eng-staff", "--db", db_url)
        assert (code, json.loads(out)) == (0, {"team": "eng", "groups": ["eng-staff"]})
    code, out, _ = run(capsys, "teams", "map-group", "eng", "eng-staff", "--remove", "--db", db_url)
    assert (code, json.loads(out)["groups"]) == (0, [])
    code, _, err = run(capsys, "teams", "map-group", "eng", "eng-staff", "--remove", "--db", db_url)
    assert code == 1 and "not mapped" in err
    assert run(capsys, "teams", "map-group", "nope", "g", "--db", db_url)[0] == 1
    for bad in ("0", "-3", "soon", "3651"):
        code, _, err = run(capsys, "keys", "create", "--team", "eng", "--expires", bad, "--db", db_url)
        assert code != 0 and err.startswith("spendgate:"), bad
    code, out, _ = run(capsys, "keys", "create", "--team", "eng", "--expires", "30", "--format", "json", "--db", db_url)
    made = json.loads(out)
    expires = datetime.fromisoformat(made["expires_at"])
    assert code == 0 and timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    code, out, _ = run(capsys, "keys", "rotate", made["id"], "--db", db_url)
    new_key = out.splitlines()[-1]
    assert code == 0 and new_key.startswith("sk-sg-") and new_key != made["key"]
    listed = {key["id"]: key for key in json.loads(run(capsys, "keys", "list", "--format", "json", "--db", db_url)[1])}
    assert listed[made["id"]]["revoked_at"] is not None
    [fresh] = [key for key in listed.values() if key["revoked_at"] is None]
    assert fresh["expires_at"] is not None and fresh["key_owner"] is None
    assert run(capsys, "keys", "rotate", made["id"], "--db", db_url)[0] == 1  # a revoked key is not rotated
    code, out, _ = run(capsys, "keys", "list", "--owner", "oidc:nobody", "--format", "json", "--db", db_url)
    assert (code, json.loads(out)) == (0, [])


@pytest.mark.parametrize(
    "url", ["http://spendgate.example.com", "ftp://127.0.0.1", "spendgate.example.com", "https://"]
)
def test_login_sends_keys_over_https_only(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = run(capsys, "login", "--url", url)
    assert (code, out) == (1, "") and "over https" in err


def test_key_helper_without_a_login_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_CREDENTIALS", str(tmp_path / "none.json"))
    code, out, err = run(capsys, "key-helper")
    assert (code, out) == (1, "") and "spendgate login" in err
    (tmp_path / "none.json").write_text("{not json")
    code, out, err = run(capsys, "key-helper")
    assert (code, out) == (1, "") and "cannot read" in err
