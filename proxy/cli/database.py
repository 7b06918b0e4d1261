"""The ledger as commands use it: a database spendgate supports, migrated to the newest schema, and who the audit
trail names for the changes commands make."""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli.errors import UsageError
from proxy.config import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.engine import URL


@contextlib.contextmanager
def open_ledger(settings: Settings) -> Iterator[Engine]:
    """An engine on a ledger that exists and is migrated; a one-line `UsageError` naming the fix otherwise."""
    from proxy.ledger.db import head_revision, make_engine, migration_of

    url = check_url(settings.db_url)
    shown = url.render_as_string(hide_password=True)
    database = Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None
    if database is not None and database.parent.is_dir() and not database.exists():
        # SQLite would create an empty file here and then fail on the first query. (Where the folder is missing
        # it cannot, and `db upgrade` would not help: opening fails, and `main._ledger_failure` says why.)
        raise UsageError(
            f"no ledger at {shown}. Run `spendgate db upgrade --db {shown}` to create it, or pass --db (or set "
            "SPENDGATE_DB_URL) to the ledger `spendgate serve` uses."
        )
    engine = make_engine(settings.db_url)
    try:
        current = migration_of(engine)
        if current != head_revision():
            state = "has no spendgate schema" if current is None else f"is at migration {current}"
            raise UsageError(f"the ledger at {shown} {state}. Run `spendgate db upgrade --db {shown}` first.")
        yield engine
    finally:
        engine.dispose()


def check_url(db_url: str) -> URL:
    """The parsed URL of a database spendgate supports; a one-line `UsageError` otherwise."""
    from sqlalchemy.exc import ArgumentError

    from proxy.ledger.db import normalize_url

    try:
        url = normalize_url(db_url)
    except ArgumentError:
        raise UsageError(f"{db_url!r} is not a database URL (e.g. sqlite:///./spendgate.db).") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise UsageError(
            f"spendgate keeps its ledger in SQLite or PostgreSQL, not {url.get_backend_name()}: use sqlite:///PATH "
            "or postgresql://USER@HOST/DB."
        )
    return url


def actor() -> str:
    """Who the audit trail says made a change from the command line."""
    return f"cli:{getpass.getuser()}"
