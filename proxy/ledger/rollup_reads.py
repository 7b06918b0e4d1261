"""Reading the rollups: a time range split into whole months (month rows), whole days (day rows) and the part of a
day its bounds cut (the records), each read from the coarsest rollup that has the groups asked for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Table, and_, false, func, or_, select

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

Group = tuple[str | None, ...]
# What one PostgreSQL sort or hash of a read may hold in memory before spilling to disk: the default 4 MB makes a
# month's report by team, feature and user sort on disk (0.9 s at ten million calls, 0.45 s with this).
READ_WORK_MEM = "64MB"


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
    after: Group | None = None,
    through: Group | None = None,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Totals of `measures` per group of `groups` (report names) over [since, until), only the records whose
    dimensions equal `where`'s values and whose leading groups come after `after` and not after `through` (in
    `group_order`): from the coarsest rollup that has them (`spans`). Money is Decimal (None while no call had a
    price), counts int, first and last calls datetimes."""
    where = where or {}
    table = rollup_for([*groups, *where])
    sqlite = connection.dialect.name == "sqlite"
    if not sqlite:
        # Until the caller's transaction ends (a report's own, or a recount's).
        connection.exec_driver_sql(f"SET LOCAL work_mem = '{READ_WORK_MEM}'")
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    bounded = len(after or through or ())
    for span in spans(connection, since, until, months="day" not in groups and table.name in MONTHLY):
        if bounded:
            keys, ordered = _keys(span, table, groups[:bounded], sqlite), _ordered(table, groups)
            queries = [
                totals(span, table, groups, measures, sqlite, where=where, by_group=ordered and not null).where(part)
                for part, null in _parts(keys, after, through)
            ]
        else:
            queries = [totals(span, table, groups, measures, sqlite, where=where)]
        for result in (row for each in queries for row in connection.execute(each)):
            group, values = tuple(result[: len(groups)]), result[len(groups) :]
            sums_of = {name: typed(MEASURE_OF[name], value) for name, value in zip(measures, values, strict=True)}
            if group not in found:
                found[group] = sums_of
                continue
            sums = found[group]
            for name, value in sums_of.items():
                sums[name] = combine(MEASURE_OF[name].combine, sums[name], value)
    return found


def first_groups(
    connection: Connection,
    *,
    groups: Sequence[str],
    since: datetime | None,
    until: datetime | None,
    where: Mapping[str, str] | None = None,
    after: Group | None = None,
    limit: int,
) -> list[Group]:
    """The first `limit` groups of `groups` (in `group_order`) after `after` that have calls in [since, until)
    (as `read` would total them): each span's first `limit` in the database's order (an index of the group's
    columns reads them without totalling the rest), merged."""
    where = where or {}
    table = rollup_for([*groups, *where])
    sqlite = connection.dialect.name == "sqlite"
    found: set[Group] = set()
    for span in spans(connection, since, until, months="day" not in groups and table.name in MONTHLY):
        keys, ordered = _keys(span, table, groups, sqlite), _ordered(table, groups)
        for part, null in _parts(keys, after, None):
            query = _scoped(select(*keys).distinct(), span, table, sqlite, where, by_group=ordered and not null)
            query = query.where(part).order_by(*(key.asc().nulls_first() for key in keys))
            # Of a single group whose value is NULL, the first row is all there is to find.
            found.update(tuple(row) for row in connection.execute(query.limit(1 if null and len(keys) == 1 else limit)))
    return sorted(found, key=group_order)[:limit]


def _ordered(table: Table, groups: Sequence[str]) -> bool:
    """Whether an index of `table` gives the first of `groups` in order (`schema.SessionRollup`'s, on session and
    on agent): what a page of sessions or agents reads; other groupings are few enough to total them all."""
    return table.name == "rollup_sessions" and bool(groups) and groups[0] in ("session", "agent")


def group_order(group: Sequence[str | None]) -> tuple[tuple[bool, str], ...]:
    """How reports order groups: value by value, NULL first, then text by code point (SQLite's BINARY and
    PostgreSQL's "C" collation, which `first_groups` and the bounds of `read` ask for)."""
    return tuple((value is not None, value or "") for value in group)


def _keys(span: Span, table: Table, groups: Sequence[str], sqlite: bool) -> list[ColumnElement[Any]]:
    """The columns of `groups` where `span` is read from, compared in `group_order`'s order."""
    columns = [_column(span, table, name, sqlite) for name in groups]
    return columns if sqlite else [column.collate("C") for column in columns]


def _parts(
    keys: Sequence[ColumnElement[Any]], after: Group | None, through: Group | None
) -> list[tuple[ColumnElement[bool], bool]]:
    """Rows whose `keys` come after `after` (None: from the first) and not after `through` (None: to the last) in
    `group_order`, as disjoint conditions an index on the first key can seek by: `(condition, first key is
    NULL)`. Rows whose first key is NULL (calls of no session: most rows of a fleet's applications) are one part,
    the rest another: no single range of an index holds both."""
    exact = []
    if after is not None:
        exact.append(
            or_(*(and_(*_equal(keys[:at], after[:at]), _greater(keys[at], after[at])) for at in range(len(after))))
        )
    if through is not None:
        earlier = [and_(*_equal(keys[:at], through[:at]), _less(keys[at], through[at])) for at in range(len(through))]
        exact.append(or_(*earlier, and_(*_equal(keys, through))))
    parts = []
    if after is None or after[0] is None:
        parts.append((and_(keys[0].is_(None), *exact), True))
    if through is None or through[0] is not None:
        seek: list[ColumnElement[bool]] = [keys[0].is_not(None)]
        seek += [] if after is None or after[0] is None else [keys[0] >= after[0]]
        seek += [] if through is None else [keys[0] <= through[0]]
        parts.append((and_(*seek, *exact), False))
    return parts


def _equal(keys: Sequence[ColumnElement[Any]], group: Group) -> list[ColumnElement[bool]]:
    return [key.is_(None) if value is None else key == value for key, value in zip(keys, group, strict=True)]


def _greater(key: ColumnElement[Any], value: str | None) -> ColumnElement[bool]:
    return key.is_not(None) if value is None else key > value


def _less(key: ColumnElement[Any], value: str | None) -> ColumnElement[bool]:
    # NULL comes first: nothing is before it.
    return false() if value is None else or_(key.is_(None), key < value)


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
    by_group: bool = False,
) -> Select[Any]:
    """The totals of `measures` per group of `groups` over `span`, of the records whose dimensions equal `where`'s
    values: rollup rows summed, or records counted (`by_group`: see `_scoped`)."""
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
    return _scoped(query, span, table, sqlite, where or {}, by_group=by_group)


def _scoped(
    query: Select[Any], span: Span, table: Table, sqlite: bool, where: Mapping[str, str], *, by_group: bool = False
) -> Select[Any]:
    """`query` over the rows of `span`, only those whose dimensions equal `where`'s values. `by_group`: the
    query is bounded by a range of its groups, and their index (`_ordered`) should find its rows rather than one
    on time (not for the rows whose group is NULL: that index seeks them by day, as an equal group)."""
    if span.grain == "records":
        time: ColumnElement[datetime] = RECORDS.c.started_at
        query = query.select_from(RECORDS)
    else:
        time = table.c.day
        query = query.where(table.c.grain == span.grain)
    bounds = [
        *([] if span.start is None else [time >= span.start]),
        *([] if span.end is None else [time < span.end]),
    ]
    if by_group and sqlite and span.grain != "records":
        # SQLite's planner takes any range of days for a few rows (it keeps no statistics of ranges) and would
        # read them all by the primary key, then sort every group for a page of ten; a range marked likely
        # true is no index's, so the groups' index (in order, stopping at the page's end) is chosen.
        bounds = [func.likely(bound) for bound in bounds]
    query = query.where(*bounds)
    for dimension, wanted in where.items():
        query = query.where(_column(span, table, dimension, sqlite) == wanted)
    return query
