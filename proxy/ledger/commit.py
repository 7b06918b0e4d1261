"""The one transaction that takes usage records into the ledger: insert, chain, link retries, roll up, settle
holds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, Table, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, StatementError

from proxy.ledger import partitions
from proxy.ledger.audit import extend, write_head
from proxy.ledger.budgets import SoftLimitCrossed, settle
from proxy.ledger.checkpoints import lock_head
from proxy.ledger.db import insert_rows, write_transaction
from proxy.ledger.retries import link_retries
from proxy.ledger.rollups import add, contribution
from proxy.ledger.schema import Batch, UsageRow
from proxy.types import ROW_COLUMNS, UsageRecord, column_getter

DEFAULT_SOFT_FRACTION = Decimal("0.8")
# What the writer inserts: a record's row, then its place in the audit chain (`audit.extend`).
INSERTED = (*ROW_COLUMNS, "content_hash", "chain_pos", "chain_hash")
USAGE_TABLE: Table = UsageRow.__table__  # type: ignore[assignment]
_row_values = column_getter(ROW_COLUMNS)


def record_to_row(record: UsageRecord) -> dict[str, Any]:
    """The ledger columns of a usage record (token counts flattened in among the call's fields)."""
    return dict(zip(ROW_COLUMNS, _row_values(record), strict=True))


# A record written as a retry: its team and cost.
Retried = tuple[str | None, Decimal | None]


class Inserted(NamedTuple):
    """What one write did besides inserting: the soft limits it crossed, the (team, cost) of each record it
    linked as a retry (known only here, where earlier attempts are looked up), and the ids of the batch results it
    wrote (not those already written: a batch's results read twice)."""

    crossed: list[SoftLimitCrossed]
    retries: list[Retried]
    results: list[str]


def insert_records(
    engine: Engine, records: list[UsageRecord], *, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> Inserted:
    """Insert usage records and settle their budget holds in one transaction of their own (blocking)."""
    with write_transaction(engine) as connection:
        return write_records(connection, records, soft_fraction=soft_fraction)


def write_records(
    connection: Connection, records: list[UsageRecord], *, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> Inserted:
    """Insert usage records and settle their budget holds, in the caller's write transaction.

    Ids already in the ledger are skipped and not settled again, so retrying a batch whose commit succeeded
    but whose acknowledgement was lost changes nothing. Retried calls are linked to their earlier attempts and
    every record is appended to the audit chain on the way in.
    """
    with _values_of_records():
        rows = [record_to_row(record) for record in records]
    # The chain's lock serialises every writer, so the check for ids already written cannot race.
    pos, head = lock_head(connection)
    seen = set(connection.execute(select(UsageRow.id).where(UsageRow.id.in_([r.id for r in records]))).scalars())
    fresh = []
    # The same id twice in one batch (a batch's results read twice within one flush) is written once.
    for index, record in enumerate(records):
        if record.id not in seen:
            seen.add(record.id)
            fresh.append(index)
    rows = [rows[index] for index in fresh]
    link_retries(connection, rows, [records[index].retry_window_seconds for index in fresh])
    # A month with no partition yet (a replayed call of long ago) gets one: its records would be refused.
    partitions.ensure(connection, (row["started_at"] for row in rows))
    with _values_of_records():
        write_head(connection, *extend(rows, pos, head))
        if rows:
            insert_rows(connection, USAGE_TABLE, INSERTED, [[row[name] for name in INSERTED] for row in rows])
    add(connection, [(row, contribution(row, row["cost_usd"])) for row in rows])
    # Holds are released even when their record was written before (a batch's last result read twice).
    held = [record for record in records if record.hold is not None and record.hold.held]
    finished = sorted({record.batch_id for record in held if record.batch_id is not None})
    if finished:
        connection.execute(update(Batch).where(Batch.id.in_(finished)).values(results_recorded_at=datetime.now(UTC)))
    crossed = settle(
        connection,
        [records[index] for index in fresh],
        soft_fraction=soft_fraction,
        release=[record.hold.call_id for record in held if record.hold is not None],
    )
    retried = [(row["team"], row["cost_usd"]) for row in rows if row["is_retry"]]
    return Inserted(crossed, retried, [row["id"] for row in rows if row["custom_id"] is not None])


class UnwritableRecord(Exception):
    """A record's own values cannot be stored: text with a lone surrogate no driver can encode, an integer wider
    than SQLite's. Retrying can never succeed."""


@contextlib.contextmanager
def _values_of_records() -> Iterator[None]:
    """Where the records' values are turned into rows, hashed and bound: the errors raised there come from the
    data. Anywhere else, the same exceptions are bugs of ours, not refusals, and must not set records aside."""
    try:
        yield
    except (UnicodeError, OverflowError, ValueError, TypeError) as exc:
        raise UnwritableRecord(f"{exc.__class__.__name__}: {exc}") from exc


def is_refused(error: Exception) -> bool:
    """Whether the database (or its driver, binding a value) refused the data itself, so retrying it can never
    succeed, rather than the connection failing or a bug of ours."""
    if isinstance(error, OperationalError):
        return False
    return isinstance(error, UnwritableRecord | DataError | IntegrityError) or (
        isinstance(error, StatementError) and not isinstance(error, DBAPIError)
    )
