"""Fixtures: a freshly migrated ledger per test, on SQLite by default or on `SPENDGATE_TEST_DB_URL` (PostgreSQL).

With `SPENDGATE_TEST_DB_URL` set, only the tests that use a ledger (a fixture that reads that URL) run: the others
(pricing, stream parsing, routing, the command line's words, the test IdP itself) never see it, so the SQLite pass
already ran them exactly as they would run again. The coverage floor is held on that full pass, which alone
measures child processes too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser
from sqlalchemy import Engine, text, update

from proxy.ledger.audit import GENESIS
from proxy.ledger.db import make_engine, normalize_url, upgrade
from proxy.ledger.schema import AuditHead, Base
from tests.browsers import launched_chromium
from tests.stack import Stack, running_stack

POSTGRES_URL = os.environ.get("SPENDGATE_TEST_DB_URL")
# The fixtures that hand a test the ledger under test (every other ledger fixture builds on one of them).
LEDGER_FIXTURES = frozenset({"_migrated_template", "fresh_url"})


def pytest_configure(config: pytest.Config) -> None:
    if POSTGRES_URL is not None:
        # A pass of part of the suite measures part of the code: the floor is for the full (SQLite) pass. Nor are
        # the child processes (replicas, the command line) measured: tracing them costs more than the pass itself.
        config.known_args_namespace.cov_fail_under = 0
        os.environ.pop("COVERAGE_PROCESS_CONFIG", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if POSTGRES_URL is None:
        return
    ledger = [
        item
        for item in items
        if LEDGER_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("any_dialect") is None
    ]
    others = [item for item in items if item not in ledger]
    if others:
        config.hook.pytest_deselected(items=others)
    items[:] = ledger


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, one per test module."""
    with launched_chromium() as launched:
        yield launched


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def empty_database(tmp_path: Path) -> Iterator[str]:
    """A brand-new empty database: a SQLite file under `tmp_path`, or a new PostgreSQL database dropped after."""
    if POSTGRES_URL is None:
        yield f"sqlite:///{tmp_path / ('empty-' + secrets.token_hex(4) + '.db')}"
        return
    admin = make_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = "spendgate_test_" + secrets.token_hex(4)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield normalize_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def _migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database made once per session: a SQLite file to copy, or a PostgreSQL database to truncate."""
    with empty_database(tmp_path_factory.mktemp("template")) as url:
        upgrade(url)
        yield url


@pytest.fixture
def db_url(_migrated_template: str, tmp_path: Path) -> str:
    """The URL of an empty, migrated ledger for this test alone."""
    if POSTGRES_URL is None:
        path = tmp_path / "spendgate.db"
        shutil.copy(make_engine(_migrated_template).url.database or "", path)
        return f"sqlite:///{path}"
    engine = make_engine(_migrated_template)
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables if table.name != "audit_head")
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        connection.execute(update(AuditHead).values(pos=0, hash=GENESIS))
    engine.dispose()
    return _migrated_template


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def stack(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Stack]:
    """Team `research` with one key, a fake upstream, and spendgate in front of it, all on loopback."""
    with running_stack(engine, db_url, tmp_path) as stack:
        yield stack
