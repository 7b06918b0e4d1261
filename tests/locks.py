"""The ledger held by someone else: an operator's long transaction, a migration, a backup taking locks."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence

from sqlalchemy import Engine

# What every write of a call touches: its record, the audit chain, budget counters and holds.
WRITTEN = ("usage_records", "audit_head", "budget_counters", "budget_holds")


@contextlib.contextmanager
def ledger_locked(engine: Engine, tables: Sequence[str] = WRITTEN) -> Iterator[None]:
    """Hold the ledger's write locks until the block ends: SQLite's one write lock (`BEGIN EXCLUSIVE`; readers go
    on in WAL mode), or PostgreSQL's EXCLUSIVE lock on `tables`, by default those a call writes (reads go on, writes
    and row locks wait)."""
    if engine.dialect.name == "sqlite":
        connection = sqlite3.connect(engine.url.database or "", isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            yield
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    with engine.connect() as locker:
        locker.exec_driver_sql(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
        yield
        locker.rollback()
