"""Recounting the rollups: `spendgate rollups rebuild` (from the records, under the chain's lock) and the check
`audit verify` runs (every day row against the records of its day, every month row against its day rows)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, func, select

from proxy.ledger import checkpoints
from proxy.ledger.db import write_transaction
from proxy.ledger.rollup_reads import Span, totals
from proxy.ledger.rollups import (
    MEASURE_NAMES,
    MEASURES,
    MONTHLY,
    ROLLUPS,
    Grain,
    dimensions,
    group_key,
    merge,
    typed,
    upsert,
)
from proxy.ledger.schema import UsageRow
from proxy.ledger.windows import calendar_end, calendar_start


def rebuild(engine: Engine) -> int:
    """Recompute every rollup from the records (the days a prune cut keep their totals: their records are gone).
    Returns how many rollup rows were written.

    Under the audit chain's lock, which every writer, reprice and prune checkpoint takes: nothing is recorded,
    corrected or cut meanwhile (a prune's deletes only touch days before its cut, which are not recounted).
    """
    with write_transaction(engine) as connection:
        checkpoints.lock_head(connection)
        return fill(connection)


def fill(connection: Connection) -> int:
    """Recount every rollup in the caller's transaction: day rows from the records of the days they still cover
    (a prune cut's earlier days keep theirs), month rows from the day rows. Returns how many rows were written."""
    cut = checkpoints.latest(connection)
    written = 0
    for table in ROLLUPS:
        names = dimensions(table)
        if cut is None:
            connection.execute(delete(table))
        else:
            connection.execute(delete(table).where((table.c.grain == "month") | (table.c.day >= cut.before)))
        for day in _days(connection, None if cut is None else cut.before):
            counted = recount(connection, table, day)
            upsert(connection, table, names, counted)
            written += len(counted)
        if table.name in MONTHLY:
            months = _months_of_days(connection, table)
            upsert(connection, table, names, months)
            written += len(months)
    return written


def _days(connection: Connection, since: datetime | None) -> list[datetime]:
    """The UTC days with records from `since` on: a seek for each (an old call replayed, or a clock once wrong,
    must not make a walk through every empty day between)."""
    found: list[datetime] = []
    at = since
    while True:
        first = select(func.min(UsageRow.started_at))
        started = connection.execute(first if at is None else first.where(UsageRow.started_at >= at)).scalar()
        if started is None:
            return found
        found.append(calendar_start("day", started))
        at = calendar_end("day", found[-1])


def recount(connection: Connection, table: Table, day: datetime) -> dict[tuple[Any, ...], list[Any]]:
    """A rollup's day rows for `day` as the records sum them: ("day", day, *group) -> totals."""
    sqlite = connection.dialect.name == "sqlite"
    names = dimensions(table)
    query = totals(Span(day, calendar_end("day", day), "records"), table, [*names], MEASURE_NAMES, sqlite)
    found: dict[tuple[Any, ...], list[Any]] = {}
    for result in connection.execute(query):
        sums = [typed(measure, value) for measure, value in zip(MEASURES, result[len(names) :], strict=True)]
        found[("day", day, *result[: len(names)])] = sums
    return found


def _months_of_days(
    connection: Connection, table: Table, month: datetime | None = None
) -> dict[tuple[Any, ...], list[Any]]:
    """Month rows as the day rows sum them (of one `month`, or all): ("month", month, *group) -> totals."""
    found: dict[tuple[Any, ...], list[Any]] = {}
    for (_, day, *group), sums in _stored(connection, table, "day", month).items():
        merge(found, ("month", day.replace(day=1), *group), sums)
    return found


class RollupProblem(ValueError):
    """Rollup rows that cannot be right whatever the records say: a row under a key its values do not hash to (the
    writer never adds to it), or two rows of one group."""


def _stored(
    connection: Connection, table: Table, grain: Grain, month: datetime | None = None, day: datetime | None = None
) -> dict[tuple[Any, ...], list[Any]]:
    """A rollup's rows of one grain (of one month, or one day), keyed like `recount`."""
    names = dimensions(table)
    query = select(table.c.day, table.c.group_key, *(table.c[name] for name in names))
    query = query.add_columns(*(table.c[name] for name in MEASURE_NAMES)).where(table.c.grain == grain)
    if month is not None:
        query = query.where(table.c.day >= month, table.c.day < calendar_end("month", month))
    if day is not None:
        query = query.where(table.c.day == day)
    found: dict[tuple[Any, ...], list[Any]] = {}
    for result in connection.execute(query):
        values = tuple(result[2 : 2 + len(names)])
        key = (grain, result[0], *values)
        if result[1] != group_key(values) or key in found:
            raise RollupProblem(
                f"rollup {table.name} has a {grain} row of {result[0].date().isoformat()} under a key its group "
                f"({', '.join(map(str, values))}) does not have, or twice; run `spendgate rollups rebuild`"
            )
        sums = result[2 + len(names) :]
        found[key] = [typed(measure, value) for measure, value in zip(MEASURES, sums, strict=True)]
    return found


def disagreement(engine: Engine) -> str | None:
    """The first rollup row that differs from a recount: a day row from the records of its day (every day from the
    latest prune cut on, with records or rows), a month row from its day rows. None when they all agree."""
    with _snapshot(engine) as connection:
        cut = checkpoints.latest(connection)
        since = None if cut is None else cut.before
        try:
            for table in ROLLUPS:
                problem = _check(connection, table, since)
                if problem is not None:
                    return problem
        except RollupProblem as exc:
            return str(exc)
    return None


def _check(connection: Connection, table: Table, since: datetime | None) -> str | None:
    """The first of a rollup's rows that differs from its recount, or None."""
    day_rows = select(table.c.day).where(table.c.grain == "day").distinct()
    counted = set(connection.execute(day_rows if since is None else day_rows.where(table.c.day >= since)).scalars())
    for day in sorted(counted | set(_days(connection, since))):
        problem = _compare(table, _stored(connection, table, "day", day=day), recount(connection, table, day))
        if problem is not None:
            return problem
    months = set(connection.execute(select(table.c.day).where(table.c.grain == "month").distinct()).scalars())
    if table.name in MONTHLY:
        months |= {day.replace(day=1) for day in connection.execute(day_rows).scalars()}
    for month in sorted(months):
        kept = _stored(connection, table, "month", month=month)
        problem = _compare(table, kept, _months_of_days(connection, table, month))
        if problem is not None:
            return problem
    return None


def _compare(
    table: Table, kept: dict[tuple[Any, ...], list[Any]], want: dict[tuple[Any, ...], list[Any]]
) -> str | None:
    for group in sorted(kept.keys() | want.keys(), key=_sortable):
        have, expected = kept.get(group), want.get(group)
        if have != expected:
            values = zip(dimensions(table), group[2:], strict=True)
            names = ", ".join(f"{name}={value}" for name, value in values)
            return (
                f"rollup {table.name} disagrees on the {group[0]} of {group[1].date().isoformat()} ({names}): "
                f"{_difference(have, expected)}; run `spendgate rollups rebuild`"
            )
    return None


@contextlib.contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one moment, so a write committing between two of them (records and their
    rollups commit together) cannot look like a disagreement."""
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # A deferred transaction keeps the snapshot of its first read (WAL) until it ends.
            connection.exec_driver_sql("BEGIN")
        else:
            connection = connection.execution_options(isolation_level="REPEATABLE READ")
        try:
            yield connection
        finally:
            connection.rollback()


def _sortable(group: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple("" if value is None else value for value in group)


def _difference(have: list[Any] | None, want: list[Any] | None) -> str:
    if have is None:
        return "the rollup has no row for calls that were made"
    if want is None:
        return "the rollup counts calls that were never made"
    return "; ".join(
        f"{measure.name} {old} (records: {new})"
        for measure, old, new in zip(MEASURES, have, want, strict=True)
        if old != new
    )
