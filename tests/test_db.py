"""Migrations: idempotent, and safe when several replicas start at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import column, inspect, select, table as table_, text
from sqlalchemy.sql.elements import TextClause

from proxy.ledger.commit import insert_records
from proxy.ledger.db import make_engine, normalize_url, upgrade
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.partitions import is_partition
from proxy.ledger.schema import Base
from proxy.ledger.teams import TeamSettings, create_team
from tests.conftest import empty_database
from tests.test_writer import make_record


@pytest.fixture
def fresh_url(tmp_path: Path) -> Iterator[str]:
    with empty_database(tmp_path) as url:
        yield url


def upgrade_concurrently(url: str, replicas: int = 4) -> list[BaseException]:
    """Run `upgrade` from several threads at once, as replicas starting together would; returns their errors."""
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade(url)
        except BaseException as exc:  # collected for the caller to assert on
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_plain_postgresql_urls_use_psycopg() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_concurrent_upgrades_on_a_fresh_database(fresh_url: str) -> None:
    assert upgrade_concurrently(fresh_url) == []
    engine = make_engine(fresh_url)
    assert {"teams", "api_keys", "usage_records"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    engine.dispose()


def test_concurrent_upgrades_on_a_migrated_database(db_url: str) -> None:
    assert upgrade_concurrently(db_url) == []


def migrate(url: str, revision: str) -> None:
    """Up or down to `revision`, as an operator would with Alembic."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("proxy.migrations")))
    engine = make_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        if revision == "head":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)
    engine.dispose()


def test_the_holds_table_renamed_both_ways_keeps_every_hold(fresh_url: str) -> None:
    """0013 renames budget_reservations to budget_holds (and back) with its indexes and holds; on PostgreSQL a
    replica of the release before, still serving while a new one migrated, writes holds under the old name."""
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    hold = "(call_id, scope, period_start, amount_usd, expires_at) VALUES (:call, 'team:1:month', :at, 1, :at)"
    with engine.begin() as connection:
        connection.execute(text(f"INSERT INTO budget_holds {hold}"), {"call": "sgr_new", "at": "2026-12-01 00:00:00"})
        if engine.dialect.name == "postgresql":
            old = {"call": "sgr_old", "at": "2026-12-01 00:00:00"}
            connection.execute(text(f"INSERT INTO budget_reservations {hold}"), old)
            connection.execute(text("DELETE FROM budget_reservations WHERE call_id = 'sgr_old'"))
    engine.dispose()

    def state(table: str) -> tuple[list[str], set[str]]:
        engine = make_engine(fresh_url)
        with engine.connect() as connection:
            calls: list[str] = list(connection.execute(select(column("call_id")).select_from(table_(table))).scalars())
        indexes = {index["name"] for index in inspect(engine).get_indexes(table) if index["name"]}
        engine.dispose()
        return calls, indexes

    new_indexes = {"ix_budget_holds_expires_at", "ix_budget_holds_instance"}
    assert state("budget_holds") == (["sgr_new"], new_indexes)
    migrate(fresh_url, "0012")
    assert state("budget_reservations") == (
        ["sgr_new"],
        {name.replace("holds", "reservations") for name in new_indexes},
    )
    migrate(fresh_url, "head")
    assert state("budget_holds") == (["sgr_new"], new_indexes)


def test_going_back_before_expiring_keys_revokes_the_keys_that_expire(fresh_url: str) -> None:
    """The release before 0014 cannot read an expiry: a downgrade revokes the keys that have one."""
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    create_team(engine, "eng", TeamSettings(), actor="test")
    expiring, _ = create_key(engine, "eng", actor="test", expires_days=5)
    lasting, _ = create_key(engine, "eng", actor="test")
    engine.dispose()
    migrate(fresh_url, "0013")
    engine = make_engine(fresh_url)
    with engine.connect() as connection:
        revoked: dict[str, object] = dict(connection.execute(text("SELECT id, revoked_at FROM api_keys")).all())
    engine.dispose()
    assert revoked[expiring.id] is not None and revoked[lasting.id] is None
    migrate(fresh_url, "head")


ORDERED_INDEXES = {
    index.name
    for table in Base.metadata.tables.values()
    for index in table.indexes
    if any(isinstance(expression, TextClause) for expression in index.expressions)
}


def test_the_migrations_make_the_schema_the_models_describe(fresh_url: str) -> None:
    """Every table, column and index of `proxy/ledger/schema.py` is made by a migration, and nothing else is."""
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with engine.connect() as connection:
        dialect = connection.dialect.name

        def made_here(thing: object, name: str | None, kind: str, reflected: bool, other: object) -> bool:
            if kind == "table" and reflected and name is not None and is_partition(name):
                return False  # a month of usage_records (migration 0019)
            if dialect == "postgresql" and name in ORDERED_INDEXES:
                # Reflection drops an index expression's COLLATE: test_rollups EXPLAINs that reports use them.
                return False
            # An index declared for the other database only (`ddl_if`) is not made on this one.
            only = getattr(thing, "_ddl_if", None)
            return reflected or only is None or only.dialect in (None, dialect)

        context = MigrationContext.configure(connection, opts={"include_object": made_here})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


SESSION_COLUMNS = {"session", "agent", "parent_agent"}
SESSION_TABLES = ("usage_records", "budget_holds", "batches")


def test_sessions_go_back_and_forth_and_every_record_stays(fresh_url: str) -> None:
    """0015 adds a call's session and agents to records, holds and batches, and the team-and-session index; going
    back removes them (the release before knows none) and keeps every record."""
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    insert_records(engine, [make_record(id="sgr_s", session="s-1", agent="a", parent_agent="p")])
    engine.dispose()

    def shape() -> tuple[dict[str, set[str]], bool, list[str]]:
        engine = make_engine(fresh_url)
        inspector = inspect(engine)
        columns = {
            table: {c["name"] for c in inspector.get_columns(table)} & SESSION_COLUMNS for table in SESSION_TABLES
        }
        indexed = "ix_usage_session" in {index["name"] for index in inspector.get_indexes("usage_records")}
        with engine.connect() as connection:
            ids = list(connection.execute(text("SELECT id FROM usage_records")).scalars())
        engine.dispose()
        return columns, indexed, ids

    assert shape() == (dict.fromkeys(SESSION_TABLES, SESSION_COLUMNS), True, ["sgr_s"])
    migrate(fresh_url, "0014")
    assert shape() == (dict.fromkeys(SESSION_TABLES, set()), False, ["sgr_s"])
    migrate(fresh_url, "head")
    assert shape() == (dict.fromkeys(SESSION_TABLES, SESSION_COLUMNS), True, ["sgr_s"])
    engine = make_engine(fresh_url)
    [record] = [record for _, record in iter_usage(engine)]
    engine.dispose()
    assert (record["id"], record["session"]) == ("sgr_s", None)
