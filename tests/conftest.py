"""Fixtures: a freshly migrated ledger per test, on SQLite by default or on `SPENDGATE_TEST_DB_URL` (PostgreSQL)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from proxy.db import make_engine, normalize_url, upgrade
from proxy.models import Base

POSTGRES_URL = os.environ.get("SPENDGATE_TEST_DB_URL")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def _migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database made once per session: a SQLite file to copy, or a PostgreSQL database to truncate."""
    if POSTGRES_URL is None:
        path = tmp_path_factory.mktemp("template") / "template.db"
        upgrade(f"sqlite:///{path}")
        yield str(path)
        return
    admin = make_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = "spendgate_test_" + secrets.token_hex(4)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = normalize_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db_url(_migrated_template: str, tmp_path: Path) -> str:
    """The URL of an empty, migrated ledger for this test alone."""
    if POSTGRES_URL is None:
        path = tmp_path / "spendgate.db"
        shutil.copy(_migrated_template, path)
        return f"sqlite:///{path}"
    engine = make_engine(_migrated_template)
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return _migrated_template


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()
