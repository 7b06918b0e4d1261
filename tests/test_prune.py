"""Retention: `spendgate prune` exports the oldest records, writes the chain's checkpoint, deletes them; reports,
budgets and `audit verify` hold across it, and tampering after it is still caught."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, text

from proxy.cli.main import main
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.export import PUBLIC_FIELDS
from proxy.ledger.reports import report
from proxy.ledger.schema import AdminEvent, UsageRow
from proxy.ledger.teams import TeamSettings, create_team
from proxy.pricing.table import PriceTable
from proxy.reconcile.compare import ledger_buckets
from proxy.reconcile.scheduled import claim_day
from tests.conftest import POSTGRES_URL
from tests.locks import ledger_locked
from tests.test_writer import make_record
from tests.waiting import wait_until

PRICES = PriceTable.load()
TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
HORIZON = TODAY - timedelta(days=3)


def fill(engine: Engine) -> None:
    """Records over the last six days in time order, then one that started before the horizon but was chained
    after newer ones (a long call, a batch result), and a call in flight across the horizon's midnight."""
    records = [
        make_record(
            id=f"sgr_p{n:03}",
            started_at=TODAY - timedelta(days=6) + timedelta(hours=3 * n),
            team=("ops", "research")[n % 2],
            user=f"u{n % 3}",
            cost_usd=Decimal(n) / 100,
        )
        for n in range(44)
    ]
    insert_records(engine, records[:30])
    insert_records(engine, [make_record(id="sgr_late", started_at=HORIZON - timedelta(hours=1), cost_usd=Decimal(1))])
    insert_records(engine, records[30:])


def count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(UsageRow)).scalar_one())


def test_prune_exports_checkpoints_and_deletes(
    engine: Engine, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(engine)
    by_day = [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])]
    spent = {row.group["team"]: row.cost_usd for row in report(engine, PRICES, by=["team"])}
    export = tmp_path / "old.jsonl.gz"
    assert main(["prune", "--before", HORIZON.date().isoformat(), "--export", str(export), "--db", db_url]) == 0
    result = json.loads(capsys.readouterr().out)
    # The chain's prefix that started before the horizon; the late record is chained after newer ones, so it stays
    # until a later horizon passes them too.
    assert (result["pruned"], result["kept_older"]) == (24, 1)
    assert result["export_sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    lines = [json.loads(line) for line in gzip.decompress(export.read_bytes()).splitlines()]
    assert [line["id"] for line in lines] == [f"sgr_p{n:03}" for n in range(24)]
    assert set(lines[0]) == {*PUBLIC_FIELDS, "chain_pos", "content_hash", "chain_hash"}
    assert [line["chain_pos"] for line in lines] == list(range(1, 25))
    assert lines[-1]["chain_hash"] == result["cut_hash"] and result["cut_pos"] == 24
    assert count(engine) == 45 - 24
    # The chain verifies from the checkpoint; reports and spend are what they were (the rollups keep the days).
    verdict = verify(engine)
    assert (verdict.problem, verdict.checkpoint, verdict.entries) == (None, 24, 22)
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])] == by_day
    assert {row.group["team"]: row.cost_usd for row in report(engine, PRICES, by=["team"])} == spent
    assert main(["audit", "verify", "--db", db_url]) == 0
    assert "from the prune checkpoint at entry 24" in capsys.readouterr().out
    # A read bounded inside a pruned day cannot be answered from whole days: refused, not silently short.
    inside = (HORIZON - timedelta(days=1, hours=5)).isoformat()
    assert main(["report", "--since", inside, "--db", db_url]) == 1
    assert "were pruned" in capsys.readouterr().err
    # Nor can a reconciliation hold a pruned day against Anthropic's figures; the daily check passes them by.
    with pytest.raises(ValueError, match="were pruned"):
        ledger_buckets(engine, HORIZON - timedelta(days=1), HORIZON, "day")
    claimed = claim_day(engine, TODAY + timedelta(hours=23))
    assert claimed is not None and claimed >= HORIZON
    # A later horizon takes the late record with what was chained before it, into a CSV export this time.
    later = tmp_path / "later.csv"
    assert main(["prune", "--before", TODAY.date().isoformat(), "--export", str(later), "--db", db_url]) == 0
    assert json.loads(capsys.readouterr().out)["pruned"] == 21
    assert later.read_text().splitlines()[0].split(",")[-3:] == ["chain_pos", "content_hash", "chain_hash"]
    assert verify(engine).problem is None
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])] == by_day


@pytest.mark.parametrize(
    "tamper, problem",
    [
        pytest.param(
            "UPDATE usage_records SET input_tokens = 1 WHERE chain_pos = 30",
            "entry 30 (usage record sgr_p029) was edited",
            id="a-kept-record-edited",
        ),
        pytest.param(
            "DELETE FROM admin_events WHERE action = 'prune'", "entry 1 is missing", id="the-checkpoint-dropped"
        ),
        pytest.param(
            "DELETE FROM usage_records WHERE chain_pos = 25",
            "entry 25 is missing",
            id="a-kept-record-deleted",
        ),
    ],
)
def test_tampering_after_a_prune_is_caught(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, problem: str, db_url: str
) -> None:
    fill(engine)
    horizon = HORIZON.date().isoformat()
    assert main(["prune", "--before", horizon, "--export", str(tmp_path / "x.jsonl"), "--db", db_url]) == 0
    with engine.begin() as connection:
        connection.execute(text(tamper))
    found = verify(engine).problem
    assert found is not None and problem in found


def test_prune_refuses_what_it_cannot_do_safely(
    engine: Engine, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(engine)
    taken = tmp_path / "taken.jsonl"
    taken.write_text("an earlier export\n")
    cases = {
        "exists: an earlier export is never overwritten": [
            "--before",
            HORIZON.date().isoformat(),
            "--export",
            str(taken),
        ],
        "must be a date": ["--before", (HORIZON + timedelta(hours=1)).isoformat(), "--export", str(tmp_path / "a")],
        "is in the future": [
            "--before",
            (TODAY + timedelta(days=1)).date().isoformat(),
            "--export",
            str(tmp_path / "b"),
        ],
        "SPENDGATE_RETENTION_DAYS": ["--export", str(tmp_path / "c")],
    }
    for message, arguments in cases.items():
        assert main(["prune", *arguments, "--db", db_url]) == 1
        assert message in capsys.readouterr().err
    assert taken.read_text() == "an earlier export\n" and count(engine) == 45
    # The setting gives the horizon: keep three days.
    monkeypatch.setenv("SPENDGATE_RETENTION_DAYS", "3")
    assert main(["prune", "--export", str(tmp_path / "kept.jsonl"), "--db", db_url]) == 0
    assert json.loads(capsys.readouterr().out)["before"] == HORIZON.date().isoformat()
    earlier = (HORIZON - timedelta(days=1)).date().isoformat()
    assert main(["prune", "--before", earlier, "--export", str(tmp_path / "d"), "--db", db_url]) == 1
    assert "already pruned up to" in capsys.readouterr().err


def test_a_forged_checkpoint_hides_nothing(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """A prune event written behind spendgate's back, past the head or claiming a cut after itself, is no
    checkpoint: verify still walks (and catches) what it would hide, and prune will not delete on its word."""
    create_team(engine, "ops", TeamSettings(), actor="test")  # an admin event at entry 1, before any cut
    fill(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE usage_records SET input_tokens = 1 WHERE chain_pos = 40"))
    head = verify(engine).head_pos
    forged = {"before": TODAY.isoformat(), "cut_pos": head, "cut_hash": "0" * 64, "records": 0}
    details = json.dumps({"before": {}, "after": forged})
    for position in (head + 1_000_000, 3):
        with engine.begin() as connection:
            connection.execute(
                insert(AdminEvent).values(
                    at=TODAY,
                    actor="x",
                    action="prune",
                    target="usage_records",
                    details=details,
                    content_hash="0" * 64,
                    chain_pos=position,
                    chain_hash="0" * 64,
                )
            )
        problem = verify(engine).problem
        assert problem is not None and ("was edited" in problem or "forged" in problem), problem
    assert main(["prune", "--before", HORIZON.date().isoformat(), "--export", str(tmp_path / "x"), "--db", db_url]) == 1
    assert count(engine) == 45


def test_admin_events_before_the_cut_stay_checked(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Admin events are never pruned; those chained before the cut keep their content hashes checked."""
    create_team(engine, "ops", TeamSettings(budget_usd=Decimal(5)), actor="test")
    fill(engine)
    assert main(["prune", "--before", HORIZON.date().isoformat(), "--export", str(tmp_path / "x"), "--db", db_url]) == 0
    assert verify(engine).problem is None
    with engine.begin() as connection:
        connection.execute(text("UPDATE admin_events SET actor = 'mallory' WHERE chain_pos = 1"))
    assert verify(engine).problem == "admin event at entry 1, before the prune checkpoint, was edited"


@pytest.mark.skipif(
    POSTGRES_URL is None, reason="SQLite has one write lock: deletes cannot wait while a checkpoint goes"
)
def test_a_prune_killed_while_deleting_is_finished_by_the_next(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """SIGKILL after the checkpoint, with the deletes held back (the test holds usage_records in SHARE mode, which
    lets the export read and the checkpoint write, not delete): the records stay, the chain still verifies from
    the checkpoint, reports are whole, and the next prune deletes them first before it exports anything new."""
    fill(engine)
    by_day = [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])]
    first = tmp_path / "first.jsonl"
    with engine.connect() as holder:
        holder.execute(text("LOCK TABLE usage_records IN SHARE MODE"))
        kill_prune(db_url, first, lambda: bool(prune_events(engine)), "the prune's checkpoint")
        holder.rollback()
    [event] = prune_events(engine)
    assert event["records"] == 24 and count(engine) == 45
    assert event["export"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert verify(engine).problem is None
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])] == by_day
    # The same horizon again: nothing new to export, the dead prune's records deleted.
    again = tmp_path / "again.jsonl"
    assert main(["prune", "--before", HORIZON.date().isoformat(), "--export", str(again), "--db", db_url]) == 0
    assert count(engine) == 45 - 24 and not again.exists() and len(prune_events(engine)) == 1
    verdict = verify(engine)
    assert (verdict.problem, verdict.checkpoint) == (None, 24)
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])] == by_day


def prune_events(engine: Engine) -> list[dict[str, Any]]:
    """What every prune checkpoint says (its audit event's `after`)."""
    with engine.connect() as connection:
        rows = connection.execute(select(AdminEvent.details).where(AdminEvent.action == "prune")).scalars()
        return [json.loads(details)["after"] for details in rows]


def test_a_prune_killed_before_its_checkpoint_leaves_the_ledger_as_it_was(
    engine: Engine, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL with the export written and the checkpoint waiting for the ledger's write lock: a prune exports
    before it writes anything, so nothing is pruned and the chain verifies; the dead prune's export is never
    overwritten, and a prune to a new file goes as usual. (Deleting only after the checkpoint is the test above.)"""
    fill(engine)
    by_day = [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])]
    first = tmp_path / "first.jsonl"
    with ledger_locked(engine):
        kill_prune(db_url, first, first.exists, "the prune's export")
    assert prune_events(engine) == [] and count(engine) == 45 and verify(engine).problem is None
    written = first.read_bytes()
    horizon = HORIZON.date().isoformat()
    assert main(["prune", "--before", horizon, "--export", str(first), "--db", db_url]) == 1
    assert "exists: an earlier export is never overwritten" in capsys.readouterr().err
    assert first.read_bytes() == written
    second = tmp_path / "second.jsonl"
    assert main(["prune", "--before", horizon, "--export", str(second), "--db", db_url]) == 0
    assert json.loads(capsys.readouterr().out)["pruned"] == 24 and second.read_bytes() == written
    assert count(engine) == 45 - 24 and verify(engine).problem is None
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day", "user"])] == by_day


def kill_prune(db_url: str, export: Path, reached: Callable[[], bool], what: str) -> None:
    """Run `spendgate prune` to the HORIZON in a child process and SIGKILL it once `reached` (`what`) is true."""
    process = prune_process(db_url, export)
    try:
        wait_until(lambda: reached() or process.poll() is not None, what)
    finally:
        process.kill()
        _, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, err.decode()


def test_of_two_prunes_at_once_one_cuts_and_the_other_is_refused(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Two prunes export the same records while the ledger's write lock is held, then race for the checkpoint:
    one cuts, the other finds the cut moved, is refused and removes its export, and the ledger verifies."""
    fill(engine)
    exports = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with ledger_locked(engine):
        processes = [prune_process(db_url, export) for export in exports]
        wait_until(lambda: all(export.exists() for export in exports), "both prunes' exports")
    errors = [process.communicate(timeout=60)[1].decode() for process in processes]
    assert sorted(process.returncode for process in processes) == [0, 1], errors
    assert any("another prune cut the ledger meanwhile" in error for error in errors), errors
    [kept] = [export for export in exports if export.exists()]
    [event] = prune_events(engine)
    assert (event["records"], event["export"]["sha256"]) == (24, hashlib.sha256(kept.read_bytes()).hexdigest())
    assert count(engine) == 45 - 24 and verify(engine).problem is None


def prune_process(db_url: str, export: Path) -> subprocess.Popen[bytes]:
    """`spendgate prune` to the HORIZON, exporting to `export`, in a child process (its errors on a pipe)."""
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "prune", "--before", HORIZON.date().isoformat()]
        + ["--export", str(export), "--db", db_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
