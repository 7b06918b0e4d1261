"""The audit chain: intact ledgers verify; every kind of tampering is caught at the right entry."""

from __future__ import annotations

import getpass
import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from proxy.cli.main import main
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.key_admin import create_key, revoke_key
from proxy.ledger.teams import TeamSettings, create_team, update_team
from tests.conftest import POSTGRES_URL
from tests.replicas import replicas
from tests.servers import serve_in_thread
from tests.test_writer import make_record
from tests.upstream import FakeAnthropic

START = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def fill(engine: Engine) -> None:
    """Six entries: a team (event 1), records 2-3, a key (event 4), records 5-6."""
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(10)), actor="test")
    insert_records(engine, [make_record(id="sgr_a", started_at=START), make_record(id="sgr_b", started_at=START)])
    create_key(engine, "research", actor="test")
    later = START + timedelta(minutes=1)
    insert_records(engine, [make_record(id="sgr_c", started_at=later), make_record(id="sgr_d", started_at=later)])


def execute(engine: Engine, sql: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(sql))


def test_intact_ledger_verifies(engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(engine)
    verdict = verify(engine)
    assert (verdict.problem, verdict.entries, verdict.head_pos) == (None, 6, 6)
    assert main(["audit", "verify", "--db", db_url]) == 0
    assert capsys.readouterr().out.startswith("audit chain intact: 6 entries, head 6 ")


def test_empty_ledger_verifies(engine: Engine) -> None:
    assert verify(engine).problem is None


@pytest.mark.parametrize(
    "tamper, problem",
    [
        pytest.param(
            "UPDATE usage_records SET cost_usd = '0.00001' WHERE id = 'sgr_b'",
            "entry 3 (usage record sgr_b) was edited",
            id="edited-cost",
        ),
        pytest.param(
            "UPDATE usage_records SET output_tokens = 1 WHERE id = 'sgr_c'",
            "entry 5 (usage record sgr_c) was edited",
            id="edited-tokens",
        ),
        pytest.param(
            "UPDATE admin_events SET actor = 'someone-else' WHERE chain_pos = 1",
            "entry 1 (admin event 1) was edited",
            id="edited-event",
        ),
        pytest.param("DELETE FROM usage_records WHERE id = 'sgr_b'", "entry 3 is missing", id="deleted"),
        pytest.param("DELETE FROM usage_records WHERE id = 'sgr_d'", "the chain ends at entry 5", id="truncated"),
        pytest.param(
            # Swap two records' places (through a free position: positions are unique).
            "UPDATE usage_records SET chain_pos = 100 WHERE id = 'sgr_a';"
            "UPDATE usage_records SET chain_pos = 2 WHERE id = 'sgr_b';"
            "UPDATE usage_records SET chain_pos = 3 WHERE id = 'sgr_a'",
            "entry 2 (usage record sgr_b) does not follow entry 1",
            id="reordered",
        ),
    ],
)
def test_tampering_is_caught(engine: Engine, db_url: str, tamper: str, problem: str) -> None:
    fill(engine)
    for statement in tamper.split(";"):
        execute(engine, statement)
    verdict = verify(engine)
    assert verdict.problem is not None and verdict.problem.startswith(problem), verdict.problem
    assert main(["audit", "verify", "--db", db_url]) == 3


def test_inserted_record_is_caught(engine: Engine) -> None:
    fill(engine)
    forged = make_record(id="sgr_forged")
    insert_records(engine, [forged])
    # Forge: a row written behind spendgate's back, copying a real entry's chain fields.
    execute(engine, "UPDATE usage_records SET chain_pos = NULL WHERE id = 'sgr_forged'")
    execute(engine, "UPDATE audit_head SET pos = pos - 1")
    verdict = verify(engine)
    assert verdict.problem == "usage record sgr_forged is outside the chain (inserted behind spendgate's back)"


def test_forged_entry_in_the_chain_is_caught(engine: Engine) -> None:
    fill(engine)
    execute(
        engine,
        "UPDATE usage_records SET content_hash = (SELECT content_hash FROM usage_records WHERE id = 'sgr_a') "
        "WHERE id = 'sgr_b'",
    )
    assert (verify(engine).problem or "").startswith("entry 3 (usage record sgr_b) was edited")


def test_admin_events_carry_actor_before_and_after(
    engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["teams", "create", "research", "--budget", "10", "--db", db_url]) == 0
    assert main(["teams", "update", "research", "--budget", "25", "--db", db_url]) == 0
    capsys.readouterr()
    view, key = create_key(engine, "research", actor="admin:abc")
    revoke_key(engine, view.id, actor="admin:abc")
    assert main(["audit", "export", "--db", db_url]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("team.create", f"cli:{getpass.getuser()}"),
        ("team.update", f"cli:{getpass.getuser()}"),
        ("key.create", "admin:abc"),
        ("key.revoke", "admin:abc"),
    ]
    assert (events[1]["before"]["budget_usd"], events[1]["after"]["budget_usd"]) == ("10", "25")
    assert events[2]["after"]["team"] == "research"
    assert key not in json.dumps(events)
    assert main(["audit", "export", "--since", "2999-01-01", "--db", db_url]) == 0
    assert capsys.readouterr().out == ""


def test_concurrent_writers_keep_one_chain(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    count = 1 if POSTGRES_URL is None else 2
    with serve_in_thread(FakeAnthropic()) as upstream, replicas(db_url, upstream, tmp_path, count) as urls:

        def call(n: int) -> None:
            body = {"model": "claude-sonnet-4-6", "max_tokens": n + 1, "messages": []}
            httpx.post(f"{urls[n % len(urls)]}/v1/messages", json=body, headers={"x-api-key": key})

        def change(n: int) -> None:
            update_team(engine, "research", TeamSettings(budget_usd=Decimal(n + 1)), actor="t")

        threads = [threading.Thread(target=call, args=(n,)) for n in range(40)]
        threads += [threading.Thread(target=change, args=(n,)) for n in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    verdict = verify(engine)
    assert verdict.problem is None
    # 2 setup events + 40 records + 5 updates.
    assert verdict.entries == 47
