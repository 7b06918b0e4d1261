"""Migrations: idempotent, and safe when several replicas start at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from proxy.ledger.db import make_engine, normalize_url, upgrade
from tests.conftest import empty_database


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
