"""Monthly partitions of the usage records on PostgreSQL (migration 0019): records land in their month's table,
months are made ahead and on demand (by any number of processes at once), the migration moves every record both
ways, reads of a day touch its month alone, and a prune drops whole months it has exported."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from proxy.ledger import partitions
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records, is_refused
from proxy.ledger.db import make_engine, upgrade
from proxy.ledger.reports import report
from proxy.ledger.retention import prune
from proxy.ledger.rollup_reads import Span, totals
from proxy.ledger.rollups import ROLLUPS
from proxy.pricing.table import PriceTable
from tests.conftest import empty_database
from tests.test_db import migrate
from tests.test_writer import make_record
from tests.waiting import wait_until

PRICES = PriceTable.load()
NOW = datetime.now(UTC)


@pytest.fixture
def postgres(engine: Engine) -> Engine:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite keeps the records in one table")
    return engine


def placed(engine: Engine) -> dict[str, str]:
    """Each record's id and the table it is in."""
    with engine.connect() as connection:
        found = connection.execute(text("SELECT id, tableoid::regclass::text FROM usage_records"))
        return {record_id: table for record_id, table in found}


def test_sqlite_keeps_one_table(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL partitions the records")
    partitions.make_ahead(engine, NOW)
    insert_records(engine, [make_record(id="sgr_one", started_at=datetime(2031, 5, 2, tzinfo=UTC))])
    with engine.connect() as connection:
        assert partitions.existing(connection) == []
        tables = connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").scalars().all()
    assert not any(partitions.is_partition(name) for name in tables)


def test_records_land_in_their_months_partition_made_on_demand(postgres: Engine) -> None:
    """A record of a month with no partition yet (a call replayed long after, a clock far ahead) gets one in the
    writer's own transaction, so nothing is refused; every month's records are in that month's table alone."""
    months = [datetime(2019, 2, 28, 23, 59, 59, 999999, tzinfo=UTC), datetime(2026, 10, 31, 23, tzinfo=UTC)]
    months += [datetime(2026, 11, 1, tzinfo=UTC), datetime(2031, 5, 2, tzinfo=UTC)]
    records = [make_record(id=f"sgr_m{n}", started_at=started) for n, started in enumerate(months)]
    insert_records(postgres, records)
    assert placed(postgres) == {
        "sgr_m0": "usage_records_2019_02",
        "sgr_m1": "usage_records_2026_10",
        "sgr_m2": "usage_records_2026_11",
        "sgr_m3": "usage_records_2031_05",
    }
    assert verify(postgres).problem is None
    assert [row.calls for row in report(postgres, PRICES, by=["day"])] == [1, 1, 1, 1]


def test_months_are_made_ahead(postgres: Engine) -> None:
    at = datetime(2030, 11, 15, tzinfo=UTC)
    partitions.make_ahead(postgres, at)
    partitions.make_ahead(postgres, at)
    with postgres.connect() as connection:
        made = set(partitions.existing(connection))
    assert {"usage_records_2030_11", "usage_records_2030_12", "usage_records_2031_01"} <= made


def test_two_processes_making_one_month_at_once_both_succeed(postgres: Engine, db_url: str) -> None:
    """The second maker waits for the first (its transaction may be a writer's, holding the month it made until
    it commits), then finds the month made: neither fails, which would set a writer's records aside."""
    month = datetime(2032, 3, 9, tzinfo=UTC)
    other = make_engine(db_url)
    failed: list[BaseException] = []

    def second() -> None:
        try:
            with other.begin() as connection:
                partitions.ensure(connection, [month])
        except BaseException as error:
            failed.append(error)

    try:
        with postgres.begin() as connection:
            partitions.ensure(connection, [month])
            thread = threading.Thread(target=second)
            thread.start()
            wait_until(lambda: _waiting_for_advisory_lock(postgres), what="the second maker to wait its turn")
        thread.join(timeout=30)
        assert not thread.is_alive() and failed == []
    finally:
        other.dispose()
    insert_records(postgres, [make_record(id="sgr_march", started_at=month)])
    assert placed(postgres) == {"sgr_march": "usage_records_2032_03"}


def _waiting_for_advisory_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).scalar_one()
        )


@pytest.fixture
def fresh_postgres(engine: Engine, tmp_path: Path) -> Iterator[str]:
    if engine.dialect.name != "postgresql":
        pytest.skip("the migration changes nothing on SQLite")
    with empty_database(tmp_path) as url:
        yield url


def test_the_migration_moves_every_record_both_ways(fresh_postgres: str) -> None:
    """0018 -> 0019 copies every record into its month (ids, chain and sequence intact: the chain verifies and
    the next record follows the last); back to 0018 copies them into one table again."""
    upgrade(fresh_postgres)
    engine = make_engine(fresh_postgres)
    # And one of a clock once years wrong: its month is made, not every month between.
    starts = [datetime(2015, 3, 4, tzinfo=UTC)]
    starts += [datetime(2026, 9, 30, 12, tzinfo=UTC) + timedelta(days=n * 9) for n in range(8)]
    insert_records(engine, [make_record(id=f"sgr_g{n}", started_at=at) for n, at in enumerate(starts)])
    engine.dispose()
    migrate(fresh_postgres, "0018")
    engine = make_engine(fresh_postgres)
    assert set(placed(engine).values()) == {"usage_records"}
    with engine.connect() as connection:
        assert not connection.exec_driver_sql("SELECT count(*) FROM pg_partitioned_table").scalar_one()
    assert verify(engine).problem is None
    engine.dispose()
    migrate(fresh_postgres, "head")
    engine = make_engine(fresh_postgres)
    try:
        assert sorted(set(placed(engine).values())) == sorted({partitions.name_of(at) for at in starts})
        assert verify(engine).problem is None
        insert_records(engine, [make_record(id="sgr_next", started_at=NOW)])
        with engine.connect() as connection:
            seqs: dict[str, int] = {
                record_id: seq for record_id, seq in connection.exec_driver_sql("SELECT id, seq FROM usage_records")
            }
            made = partitions.existing(connection)
        assert seqs["sgr_next"] == max(seqs.values()) == 10
        assert partitions.name_of(NOW) in made and partitions.name_of(NOW + timedelta(days=31)) in made
        assert "usage_records_2015_03" in made and "usage_records_2015_04" not in made
    finally:
        engine.dispose()


def test_a_days_read_touches_its_month_alone(postgres: Engine) -> None:
    """The part of a day a report's bounds cut is read from the records: from that month's table only."""
    insert_records(
        postgres, [make_record(id=f"sgr_d{n}", started_at=datetime(2026, 8 + n, 3, tzinfo=UTC)) for n in range(4)]
    )
    span = Span(datetime(2026, 9, 3, 1, tzinfo=UTC), datetime(2026, 9, 3, 5, tzinfo=UTC), "records")
    query = totals(span, ROLLUPS[0], ["team"], ["calls", "cost_usd"], False)
    with postgres.connect() as connection:
        sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
        plan = " ".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "usage_records_2026_09" in plan, plan
    assert not any(f"usage_records_2026_{month:02}" in plan for month in (8, 10, 11)), plan


def test_a_prune_drops_the_months_it_exported(postgres: Engine, tmp_path: Path) -> None:
    """Whole months before the horizon go at once; a month holding a record chained after the cut (started before
    the horizon, written late) stays with that record alone; the chain verifies and reports are unchanged."""
    day = datetime(2026, 9, 1, tzinfo=UTC)
    records = [
        make_record(id=f"sgr_q{n:02}", started_at=day + timedelta(hours=30 * n), cost_usd=Decimal(n)) for n in range(60)
    ]
    insert_records(postgres, records)
    late = make_record(id="sgr_late", started_at=datetime(2026, 10, 20, tzinfo=UTC), cost_usd=Decimal(7))
    insert_records(postgres, [late])
    before = [row.to_json() for row in report(postgres, PRICES, by=["team", "day"])]
    horizon = datetime(2026, 11, 1, tzinfo=UTC)
    result = prune(postgres, before=horizon, export=tmp_path / "pruned.jsonl", fmt="jsonl", actor="test")
    assert result.kept_older == 1
    with postgres.connect() as connection:
        made = partitions.existing(connection)
    assert "usage_records_2026_09" not in made and "usage_records_2026_10" in made
    remaining = placed(postgres)
    assert remaining["sgr_late"] == "usage_records_2026_10"
    assert {table for record_id, table in remaining.items() if record_id != "sgr_late"} == {"usage_records_2026_11"}
    assert verify(postgres).problem is None
    assert [row.to_json() for row in report(postgres, PRICES, by=["team", "day"])] == before


def test_a_prune_that_cannot_take_the_table_deletes_instead(
    postgres: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding the records' table (a long export, `audit verify`) is not stopped, nor are the writers
    that would queue behind a drop: the prune waits `DROP_WAIT`, then deletes the month's records in chunks."""
    monkeypatch.setattr(partitions, "DROP_WAIT", "200ms")
    day = datetime(2026, 9, 1, tzinfo=UTC)
    insert_records(postgres, [make_record(id=f"sgr_r{n}", started_at=day + timedelta(days=n)) for n in range(40)])
    with postgres.connect() as reader:
        reader.exec_driver_sql("SELECT count(*) FROM usage_records").scalar_one()  # holds ACCESS SHARE
        result = prune(
            postgres, before=datetime(2026, 10, 1, tzinfo=UTC), export=tmp_path / "p.jsonl", fmt="jsonl", actor="t"
        )
        reader.rollback()
    assert result.records == 30
    with postgres.connect() as connection:
        assert "usage_records_2026_09" in partitions.existing(connection)
    assert set(placed(postgres).values()) == {"usage_records_2026_10"}
    assert verify(postgres).problem is None


def test_a_detached_month_holds_its_records_back_never_sets_them_aside(postgres: Engine) -> None:
    """A month an operator detached (to archive it) is not made again under its name: the write fails with an
    error that is not the records' fault (the writer keeps them and retries), and succeeds once it is back."""
    month = datetime(2031, 7, 4, tzinfo=UTC)
    insert_records(postgres, [make_record(id="sgr_july", started_at=month)])
    with postgres.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE usage_records DETACH PARTITION usage_records_2031_07")
    with pytest.raises(partitions.PartitionDetached, match="usage_records_2031_07") as refused:
        insert_records(postgres, [make_record(id="sgr_july_2", started_at=month)])
    assert not is_refused(refused.value)
    with postgres.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE usage_records ATTACH PARTITION usage_records_2031_07"
            " FOR VALUES FROM ('2031-07-01') TO ('2031-08-01')"
        )
    insert_records(postgres, [make_record(id="sgr_july_2", started_at=month)])
    assert placed(postgres) == {"sgr_july": "usage_records_2031_07", "sgr_july_2": "usage_records_2031_07"}
