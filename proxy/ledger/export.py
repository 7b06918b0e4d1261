"""Reading usage records back out of the ledger, streamed, in the spec's public shape."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Engine, literal, select, tuple_

from proxy.display import csv_row
from proxy.ledger.schema import UsageRow
from proxy.types import PUBLIC_COLUMNS, usd

# The spec's usage-record fields, in the order exports write them: the record's public columns as recorded, then
# what a reprice replaced.
PUBLIC_FIELDS = (*PUBLIC_COLUMNS, "repriced_from_cost_usd", "repriced_from_price_version")
STREAM_BATCH = 1000
Cursor = tuple[datetime, int]


def iter_usage(
    engine: Engine,
    *,
    team: str | None = None,
    session: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after: Cursor | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> Iterator[tuple[Cursor, dict[str, Any]]]:
    """Usage records oldest first (or `newest_first`) as `(cursor, record)`, streamed from the database in batches.

    Pass the last cursor seen as `after` to page: records sort by start time, ties by insertion order.
    """
    order = (UsageRow.started_at.desc(), UsageRow.seq.desc()) if newest_first else (UsageRow.started_at, UsageRow.seq)
    query = select(*UsageRow.__table__.columns).order_by(*order)
    if team is not None:
        query = query.where(UsageRow.team == team)
    if session is not None:
        query = query.where(UsageRow.session == session)
    if since is not None:
        query = query.where(UsageRow.started_at >= since)
    if until is not None:
        query = query.where(UsageRow.started_at < until)
    if after is not None:
        started_at, seq = after
        bound = tuple_(literal(started_at, UsageRow.started_at.type), literal(seq, UsageRow.seq.type))
        query = query.where(tuple_(UsageRow.started_at, UsageRow.seq) > bound)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as connection:
        result = connection.execution_options(yield_per=STREAM_BATCH).execute(query)
        for row in result:
            yield (row.started_at, row.seq), public_record(row)


def public_record(row: Any) -> dict[str, Any]:
    """A ledger row as the JSON object `spendgate usage` prints: ISO 8601 UTC times, money as exact strings."""
    record = {name: getattr(row, name) for name in PUBLIC_COLUMNS}
    record["started_at"] = row.started_at.isoformat()
    record["finished_at"] = row.finished_at.isoformat()
    record["cost_usd"] = usd(row.cost_usd)
    record["repriced_from_cost_usd"] = record["repriced_from_price_version"] = None
    if row.repriced_cost_usd is not None:
        # After `spendgate reprice`, the corrected cost is the cost; the one first recorded is kept beside it.
        record["repriced_from_cost_usd"], record["repriced_from_price_version"] = record["cost_usd"], row.price_version
        record["cost_usd"], record["price_version"] = usd(row.repriced_cost_usd), row.repriced_price_version
    return record


def write_jsonl(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    """One JSON object per line; returns how many were written."""
    count = 0
    for record in records:
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        count += 1
    return count


def write_csv(records: Iterator[dict[str, Any]], out: IO[str], *, fields: Sequence[str] = PUBLIC_FIELDS) -> int:
    """A header line and one row per record; returns how many were written."""
    count = 0
    for chunk, rows in csv_chunks(records, fields=fields):
        out.write(chunk)
        count += rows
    return count


def csv_chunks(
    records: Iterator[dict[str, Any]], rows: int = 1000, *, fields: Sequence[str] = PUBLIC_FIELDS
) -> Iterator[tuple[str, int]]:
    """The CSV text of `write_csv` in chunks of up to `rows` records, each with how many records it holds."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    count = 0
    for record in records:
        writer.writerow(csv_row(record))
        count += 1
        if count == rows:
            yield buffer.getvalue(), count
            buffer.seek(0)
            buffer.truncate()
            count = 0
    yield buffer.getvalue(), count
