"""Reading the rollups: a time range split into whole months (month rows), whole days (day rows) and the part of a
day its bounds cut (the records), each read from the coarsest rollup that has the groups asked for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Table, func, select

from proxy.ledger import checkpoints
from proxy.ledger.rollups import (
    COLUMN_OF,
    DIMENSIONS,
    MEASURE_OF,
    MONTHLY,
    RECORDS,
    Grain,
    combine,
    rollup_for,
    typed,
)
from proxy.ledger.schema import UsageRow
from proxy.ledger.windows import calendar_start, next_start


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time a read covers, and where its totals are: month rows, day rows, or the records."""

    start: datetime | None
    end: datetime | None
    grain: Grain


def spans(connection: Connection, since: datetime | None, until: datetime | None, *, months: bool) -> list[Span]:
    """[since, until) as whole months (when `months`), whole days, and at either end the part of a day it starts
    or ends inside; None is open-ended (the rows of the current day and month hold what happened so far)."""
    if since is not None and until is not None and since >= until:
        return []
    first = None if since is None else next_start("day", since)
    last = None if until is None else calendar_start("day", until)
    if first is not None and last is not None and first > last:
        found = [Span(since, until, "records")]
    else:
        found = [] if since is None or first == since else [Span(since, first, "records")]
        found += _whole_days(first, last, months)
        found += [] if until is None or last == until else [Span(last, until, "records")]
    ragged = [span.start for span in found if span.grain == "records" and span.start is not None]
    if ragged:
        # Only whole days are left of a pruned day, in the rollups.
        instead = "only whole UTC days before it can be read (give dates or midnights)"
        checkpoints.require_records(connection, min(ragged), instead)
    return found


def _whole_days(first: datetime | None, last: datetime | None, months: bool) -> list[Span]:
    """[first, last) between midnights: the whole months in it as month rows, the days around them as day rows."""
    if first is not None and last is not None and first >= last:
        return []
    if not months:
        return [Span(first, last, "day")]
    month_from = None if first is None else next_start("month", first)
    month_to = None if last is None else calendar_start("month", last)
    if month_from is not None and month_to is not None and month_from >= month_to:
        return [Span(first, last, "day")]
    found = [] if first is None or month_from == first else [Span(first, month_from, "day")]
    found.append(Span(month_from, month_to, "month"))
    return found + ([] if last is None or month_to == last else [Span(month_to, last, "day")])


def read(
    connection: Connection,
    *,
    groups: Sequence[str],
    measures: Sequence[str],
    since: datetime | None,
    until: datetime | None,
    where: Mapping[str, str] | None = None,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Totals of `measures` per group of `groups` (report names) over [since, until), only the records whose
    dimensions equal `where`'s values: from the coarsest rollup that has them (`spans`). Money is Decimal (None
    while no call had a price), counts int, first and last calls datetimes."""
    where = where or {}
    table = rollup_for([*groups, *where])
    sqlite = connection.dialect.name == "sqlite"
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for span in spans(connection, since, until, months="day" not in groups and table.name in MONTHLY):
        query = totals(span, table, groups, measures, sqlite, where=where)
        for result in connection.execute(query):
            group, values = tuple(result[: len(groups)]), result[len(groups) :]
            sums_of = {name: typed(MEASURE_OF[name], value) for name, value in zip(measures, values, strict=True)}
            if group not in found:
                found[group] = sums_of
                continue
            sums = found[group]
            for name, value in sums_of.items():
                sums[name] = combine(MEASURE_OF[name].combine, sums[name], value)
    return found


def _column(span: Span, table: Table, name: str, sqlite: bool) -> ColumnElement[Any]:
    """A group's column where `span` is read from (`day`: its date as YYYY-MM-DD text)."""
    if name == "day":
        instant = UsageRow.started_at if span.grain == "records" else table.c.day
        return func.date(instant) if sqlite else func.to_char(instant, "YYYY-MM-DD")
    column = COLUMN_OF.get(name, name)
    return DIMENSIONS[column] if span.grain == "records" else table.c[column]


def totals(
    span: Span,
    table: Table,
    groups: Sequence[str],
    measures: Sequence[str],
    sqlite: bool,
    *,
    where: Mapping[str, str] | None = None,
) -> Select[Any]:
    """The totals of `measures` per group of `groups` over `span`, of the records whose dimensions equal `where`'s
    values: rollup rows summed, or records counted."""
    keys = [_column(span, table, name, sqlite).label(name) for name in groups]
    money = func.decimal_sum if sqlite else func.sum
    aggregates = []
    for name in measures:
        measure = MEASURE_OF[name]
        value = measure.of_record if span.grain == "records" else table.c[name]
        aggregate = {"sum": func.sum, "money": money, "min": func.min, "max": func.max}[measure.combine]
        aggregates.append(aggregate(value).label(name))
    query = select(*keys, *aggregates)
    if keys:
        query = query.group_by(*keys)
    if span.grain == "records":
        time: ColumnElement[datetime] = RECORDS.c.started_at
        query = query.select_from(RECORDS)
    else:
        time = table.c.day
        query = query.where(table.c.grain == span.grain)
    if span.start is not None:
        query = query.where(time >= span.start)
    if span.end is not None:
        query = query.where(time < span.end)
    for dimension, wanted in (where or {}).items():
        query = query.where(_column(span, table, dimension, sqlite) == wanted)
    return query
