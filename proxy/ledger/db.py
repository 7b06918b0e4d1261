"""Engines and migrations for both supported databases: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Dialect, make_url

_SQLITE_WRITE_LOCKS: dict[str, _SqliteWriteLock] = {}
_LOCKS_GUARD = threading.Lock()
# Any constant works; it only has to be the same in every replica.
MIGRATION_LOCK_ID = 0x5EED_6A7E


def normalize_url(url: str) -> URL:
    """Parse a database URL; plain `postgresql://` means psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def in_memory(url: URL) -> bool:
    """Whether a ledger URL names an in-memory SQLite database: one per connection's process, which no other
    process (a worker, the writer's child) can open, and no file beside which to keep locks."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so readers never block the writer."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True, **kwargs)


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction for read-modify-write work (budget checks, settlement), committed on success.

    On SQLite it starts with `BEGIN IMMEDIATE`, taking the database's single write lock up front: a deferred
    transaction that reads first and writes later could find its snapshot stale and fail instead of waiting.
    Writers first queue on a lock of ours, threads of this process on a mutex and processes (the ledger writer's
    child, `--workers`) on a file lock beside the database: SQLite's own busy handler polls with sleeps of up
    to 100 ms, which under load turns a 1 ms wait into a tail of hundreds of milliseconds; a waiter on the file
    lock is woken by the kernel the moment it is released.
    On PostgreSQL, callers lock the rows they change with `SELECT … FOR UPDATE`.
    """
    local = _sqlite_write_lock(engine) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with local, engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


def insert_rows(
    connection: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    suffix: str = "",
    bound: bool = False,
) -> None:
    """Insert rows (each its values in `columns` order) in one driver-level `executemany`; `suffix` is SQL of
    ours to append (an `ON CONFLICT` clause); `bound`: the values are already as the columns bind them.

    For the ledger writer's bulk inserts: SQLAlchemy's own executemany rebuilds every row's parameters through
    its compiled statement, which costs more than the insert. Here the statement and each column's bind processor
    (the same ones SQLAlchemy applies: exact money text and UTC times on SQLite) are looked up once per dialect.
    """
    if not rows:
        return
    sql, processors = _insert_plan(connection.dialect, table, tuple(columns), suffix)
    processed = []
    for row in rows:
        values = list(row)
        for index, process in () if bound else processors:
            values[index] = process(values[index])
        processed.append(tuple(values))
    connection.exec_driver_sql(sql, processed)


@lru_cache(maxsize=64)
def _insert_plan(
    dialect: Dialect, table: Table, columns: tuple[str, ...], suffix: str
) -> tuple[str, tuple[tuple[int, Callable[[Any], Any]], ...]]:
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    # Identifiers from our own table metadata, quoted by the dialect; values go as parameters.
    names, markers = ", ".join(quote(name) for name in columns), ", ".join([marker] * len(columns))
    sql = f"INSERT INTO {quote(table.name)} ({names}) VALUES ({markers}){suffix}"  # noqa: S608
    processors = (
        (index, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for index, name in enumerate(columns)
    )
    return sql, tuple((index, process) for index, process in processors if process is not None)


class _SqliteWriteLock:
    """One database file's write lock: a mutex for this process's threads, then a file lock for processes."""

    def __init__(self, url: URL) -> None:
        self._mutex = threading.Lock()
        self._path = None if in_memory(url) else f"{url.database}.write-lock"
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._mutex.acquire()
        try:
            if self._path is not None:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._mutex.release()
            raise

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()


def _sqlite_write_lock(engine: Engine) -> _SqliteWriteLock:
    # One lock per database file, shared by every engine this process opens on it.
    with _LOCKS_GUARD:
        return _SQLITE_WRITE_LOCKS.setdefault(str(engine.url.database), _SqliteWriteLock(engine.url))


def _decimal_add(left: str | None, right: str | None) -> str | None:
    """SQLite function: the exact sum of two decimal texts, either of which may be NULL (then the other)."""
    if left is None or right is None:
        return right if left is None else left
    return format(Decimal(left) + Decimal(right), "f")


class _DecimalSum:
    """SQLite aggregate: the exact sum of decimal text (SQLite's own `sum` would go through floats)."""

    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = Decimal(value) if self.total is None else self.total + Decimal(value)

    def finalize(self) -> str | None:
        return None if self.total is None else format(self.total, "f")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.create_aggregate("decimal_sum", 1, _DecimalSum)
    dbapi_connection.create_function("decimal_add", 2, _decimal_add, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def upgrade(url: str) -> None:
    """Bring the schema to the newest migration.

    Safe when several replicas start at once: PostgreSQL serialises them on an advisory lock, SQLite
    on a lock file beside the database; the second replica then finds nothing left to do.
    """
    engine = make_engine(url)
    try:
        with _migration_lock(engine), engine.begin() as connection:
            config = _alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest migration shipped with this version of spendgate."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def migration_of(engine: Engine) -> str | None:
    """The migration a ledger is at, or None when it has no spendgate schema (read-only)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("proxy.migrations")))
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
        return
    if in_memory(engine.url):
        yield
        return
    with open(f"{engine.url.database}.migrate-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
