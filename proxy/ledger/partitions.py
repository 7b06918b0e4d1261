"""Monthly partitions of the usage records on PostgreSQL (migration 0019): one table per calendar month of
`started_at`, so a month's records are one table to read, vacuum and, once pruned, drop.

Partitions are made ahead (`make_ahead`, at start and hourly) and, as a last resort, by the writer for a record
whose month has none (`ensure`, in its write transaction): an insert with no partition to go to would be refused
as bad data. SQLite keeps one table; every function here does nothing there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from proxy.ledger.windows import calendar_end, calendar_start

PARENT = "usage_records"
# How long a prune waits for the records' table to drop a month, before deleting its records instead.
DROP_WAIT = "1s"
# The advisory lock partition makers take turns on ("sgpart").
_MAKERS = 0x7367706172740000
# Months made ahead of the current one: a writer rarely needs to make one itself.
MONTHS_AHEAD = 2
logger = logging.getLogger(__name__)
_NAME = re.compile(rf"^{PARENT}_(\d{{4}})_(\d{{2}})$")
# Whether a table has the name, attached or not.
_TAKEN = text(
    "SELECT EXISTS (SELECT FROM pg_class WHERE relname = :name AND relnamespace = current_schema()::regnamespace)"
)


class PartitionDetached(Exception):
    """A month's table exists but is no partition of the records' table (detached to archive it): its records
    cannot be written until it is attached again or renamed. Not the records' fault: they wait, never set aside."""


def name_of(month: datetime) -> str:
    """The partition holding the records that started in `month`'s calendar month (UTC)."""
    start = calendar_start("month", month)
    return f"{PARENT}_{start.year:04}_{start.month:02}"


def is_partition(name: str) -> bool:
    """Whether a table of that name is one of the records' monthly partitions."""
    return _NAME.match(name) is not None


def month_of(name: str) -> tuple[datetime, datetime]:
    """The [start, end) of a partition's month, from its name."""
    found = _NAME.match(name)
    if found is None:
        raise ValueError(f"{name} is not a partition of {PARENT}")
    start = datetime(int(found[1]), int(found[2]), 1, tzinfo=UTC)
    return start, calendar_end("month", start)


def ensure(connection: Connection, instants: Iterable[datetime]) -> None:
    """Make the partitions of the months of `instants` that have none, in the caller's transaction (PostgreSQL).

    Each is made as a table of its own, then attached: attaching locks the records' table against other schema
    changes only, so reads and writes go on (making it with `PARTITION OF` would wait for every reader, a
    minutes-long `audit verify` among them, and stop every writer behind it). Makers take turns on a lock of
    their own: two processes making one month at once would have one fail."""
    if connection.dialect.name != "postgresql":
        return
    names = sorted({name_of(instant) for instant in instants})
    if not names or set(names) <= set(existing(connection)):
        return
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MAKERS})
    attached = set(existing(connection))
    for name in (name for name in names if name not in attached):
        if connection.execute(_TAKEN, {"name": name}).scalar():
            raise PartitionDetached(
                f"{name} is not a partition of {PARENT}: attach it again or rename it, and its month's records"
                " are written"
            )
        start, end = (_bound(instant) for instant in month_of(name))
        connection.exec_driver_sql(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        connection.exec_driver_sql(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ({start}) TO ({end})")


def drop_pruned(engine: Engine, cut_pos: int, before: datetime) -> None:
    """Drop the partitions of the months that end by `before` and hold no record chained after `cut_pos` (all
    pruned, exported and checkpointed): a month goes at once, not 20,000 deletes at a time.

    Dropping takes the records' table for itself: every reader and writer that comes while it waits queues
    behind it, so it waits at most `DROP_WAIT` for those before it (a long `audit verify`), then leaves the
    months to chunked deletes. Under that lock no writer can add a late record to the month between the check
    and the drop; one that comes after makes the month again. Another prune may have dropped a month meanwhile."""
    with engine.connect() as connection:
        names = existing(connection)
    for name in names:
        if month_of(name)[1] > before:
            break
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{DROP_WAIT}'")
                connection.exec_driver_sql(f"LOCK TABLE {PARENT} IN ACCESS EXCLUSIVE MODE")
                if name not in existing(connection):
                    continue
                kept = connection.exec_driver_sql(
                    # `name` is a partition of the catalog's, matched by `is_partition`.
                    f"SELECT 1 FROM {name} WHERE chain_pos > %(cut)s OR chain_pos IS NULL LIMIT 1",  # noqa: S608
                    {"cut": cut_pos},
                ).first()
                if kept is None:
                    connection.exec_driver_sql(f"DROP TABLE {name}")
        except OperationalError as error:
            logger.warning("could not drop %s (%s); the records are deleted in chunks instead", name, error.orig)
            return


def _bound(instant: datetime) -> str:
    """A partition bound in the column's own form: UTC wall time without a zone (`schema.UTCDateTime`)."""
    return f"'{instant.astimezone(UTC).replace(tzinfo=None).isoformat(sep=' ')}'"


def make_ahead(engine: Engine, now: datetime) -> None:
    """Make this month's partition and the next `MONTHS_AHEAD` months' (blocking; PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        return
    months = [calendar_start("month", now)]
    for _ in range(MONTHS_AHEAD):
        months.append(calendar_end("month", months[-1]))
    with engine.begin() as connection:
        ensure(connection, months)


def existing(connection: Connection) -> list[str]:
    """The records' partitions, oldest month first (PostgreSQL; none on SQLite). Read from the catalog's rows, not
    `to_regclass` on each name: its cache may predate a maker that committed while this transaction waited."""
    if connection.dialect.name != "postgresql":
        return []
    found = connection.execute(
        text(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid"
            " WHERE pg_inherits.inhparent = to_regclass(:parent)"
        ),
        {"parent": PARENT},
    ).scalars()
    return sorted(name for name in found if is_partition(name))
