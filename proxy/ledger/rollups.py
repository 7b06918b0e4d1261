"""Rollups: the usage records' totals by UTC day and month and by group, kept in the records' own write transaction.

Three tables hold the same totals (`MEASURES`) by three sets of groups (`schema.TeamRollup`, `UserRollup`,
`SessionRollup`), each by day and by calendar month (`grain`). A read takes the coarsest table that has its
groups and splits its time range (`spans`): whole months from month rows, whole days from day rows, and the part
of a day the bounds cut from the records. So it costs months and days x groups, never a scan of the records.
`rebuild` recomputes the rollups from the records, `disagreement` (run by `audit verify`) recounts them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Dialect, Engine, Select, Table, case, delete, func, literal, select

from proxy.ledger import checkpoints
from proxy.ledger.db import insert_rows, write_transaction
from proxy.ledger.schema import SessionRollup, TeamRollup, UsageRow, UserRollup, effective_cost

Combine = Literal["sum", "money", "min", "max"]
ROLLUPS: tuple[Table, ...] = (TeamRollup.__table__, UserRollup.__table__, SessionRollup.__table__)  # type: ignore[assignment]
# The rollups with month rows besides day rows: a session seldom outlives its day, so its month rows would be as
# many as its day rows.
MONTHLY = frozenset(("rollup_teams", "rollup_users"))
# Group names as reports spell them, and the columns that hold them.
COLUMN_OF = {"key": "key_id"}
ONE_DAY = timedelta(days=1)
CHUNK = 1000
RECORDS: Table = UsageRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Measure:
    """One total: how rows combine, and what one usage record contributes, in SQL (for recounts and partial days)."""

    name: str
    combine: Combine
    of_record: ColumnElement[Any]


def _when(condition: ColumnElement[bool], value: Any, otherwise: Any = 0) -> ColumnElement[Any]:
    return case((condition, value), else_=otherwise)


_retry, _batch = RECORDS.c.is_retry.is_(True), RECORDS.c.service_tier == "batch"
MEASURES = (
    Measure("calls", "sum", literal(1)),
    Measure("input_tokens", "sum", RECORDS.c.input_tokens),
    Measure("output_tokens", "sum", RECORDS.c.output_tokens),
    Measure("cache_creation_5m_input_tokens", "sum", RECORDS.c.cache_creation_5m_input_tokens),
    Measure("cache_creation_1h_input_tokens", "sum", RECORDS.c.cache_creation_1h_input_tokens),
    Measure("cache_read_input_tokens", "sum", RECORDS.c.cache_read_input_tokens),
    Measure("web_search_requests", "sum", RECORDS.c.web_search_requests),
    Measure("cost_usd", "money", effective_cost()),
    Measure("retries", "sum", _when(_retry, 1)),
    Measure("retry_cost_usd", "money", _when(_retry, effective_cost(), None)),
    Measure("unpriced_calls", "sum", _when(RECORDS.c.price_source == "unpriced", 1)),
    Measure("family_priced_calls", "sum", _when(RECORDS.c.price_source == "family", 1)),
    Measure("batch_cost_usd", "money", _when(_batch, effective_cost(), None)),
    Measure("batch_web_search_requests", "sum", _when(_batch, RECORDS.c.web_search_requests)),
    Measure("interrupted_calls", "sum", _when(RECORDS.c.outcome == "interrupted", 1)),
    Measure("first_started_at", "min", RECORDS.c.started_at),
    Measure("last_started_at", "max", RECORDS.c.started_at),
)
MEASURE_NAMES = tuple(measure.name for measure in MEASURES)
_SUMS, _MONEY, _FIRSTS, _LASTS = (
    tuple(index for index, measure in enumerate(MEASURES) if measure.combine == kind)
    for kind in ("sum", "money", "min", "max")
)
# A group's values in a record: the record's own columns, but calls are priced as the model that served them.
DIMENSIONS: dict[str, ColumnElement[Any]] = {
    "team": RECORDS.c.team,
    "key_id": RECORDS.c.key_id,
    "feature": RECORDS.c.feature,
    "model": RECORDS.c.model,
    "priced_model": func.coalesce(RECORDS.c.response_model, RECORDS.c.model),
    "price_source": RECORDS.c.price_source,
    "user": RECORDS.c.user,
    "session": RECORDS.c.session,
    "agent": RECORDS.c.agent,
}


def contribution(row: Mapping[str, Any], cost: Decimal | None, calls: int = 1) -> tuple[Any, ...]:
    """What one record adds to its groups' totals, in `MEASURES` order: the record as written (`calls=1`), or a
    correction of its cost alone (`calls=0`, `cost` the difference). The Python twin of `Measure.of_record`."""
    retry, batch = bool(row["is_retry"]), row["service_tier"] == "batch"
    started = row["started_at"]
    return (
        calls,
        calls * row["input_tokens"],
        calls * row["output_tokens"],
        calls * row["cache_creation_5m_input_tokens"],
        calls * row["cache_creation_1h_input_tokens"],
        calls * row["cache_read_input_tokens"],
        calls * row["web_search_requests"],
        cost,
        calls * retry,
        cost if retry else None,
        calls * (row["price_source"] == "unpriced"),
        calls * (row["price_source"] == "family"),
        cost if batch else None,
        calls * row["web_search_requests"] if batch else 0,
        calls * (row["outcome"] == "interrupted"),
        started,
        started,
    )


def dimensions(table: Table) -> tuple[str, ...]:
    """The group columns of a rollup, in `DIMENSIONS` order (the order its group keys hash them in)."""
    return tuple(name for name in DIMENSIONS if name in table.c)


def rollup_for(groups: Iterable[str]) -> Table:
    """The coarsest rollup that has every one of `groups` (report names: `key`, `day` and the dimensions)."""
    wanted = {COLUMN_OF.get(name, name) for name in groups} - {"day"}
    for table in ROLLUPS:
        if wanted <= set(dimensions(table)):
            return table
    raise ValueError(f"no rollup groups by {', '.join(sorted(wanted))}")


def add(connection: Connection, changes: Sequence[tuple[Mapping[str, Any], tuple[Any, ...]]]) -> None:
    """Add `(record row, contribution)` pairs to every rollup, day and month, in the caller's write transaction."""
    if not changes:
        return
    for table in ROLLUPS:
        names, monthly = dimensions(table), table.name in MONTHLY
        totals: dict[tuple[Any, ...], list[Any]] = {}
        for row, values in changes:
            group = tuple(_value(row, name) for name in names)
            day = _day_of(row["started_at"])
            _merge(totals, ("day", day, *group), values)
            if monthly:
                _merge(totals, ("month", day.replace(day=1), *group), values)
        _upsert(connection, table, names, totals)


def _merge(totals: dict[tuple[Any, ...], list[Any]], key: tuple[Any, ...], values: Sequence[Any]) -> None:
    """Add `values` (in `MEASURES` order) to the totals of `key`; the writer's inner loop, so no call per total."""
    known = totals.get(key)
    if known is None:
        totals[key] = list(values)
        return
    for index in _SUMS:
        known[index] += values[index]
    for index in _MONEY:
        new = values[index]
        if new is not None:
            old = known[index]
            known[index] = new if old is None else old + new
    for index in _FIRSTS:
        new = values[index]
        if new is not None and (known[index] is None or new < known[index]):
            known[index] = new
    for index in _LASTS:
        new = values[index]
        if new is not None and (known[index] is None or new > known[index]):
            known[index] = new


def correct(connection: Connection, costs: Mapping[str, Decimal]) -> None:
    """Move records' corrected costs into the rollups, before the records take them (the difference is from the
    cost as it stands), in the caller's write transaction."""
    ids = sorted(costs)
    changes = []
    for start in range(0, len(ids), CHUNK):
        query = select(*UsageRow.__table__.columns, effective_cost().label("current")).where(
            UsageRow.id.in_(ids[start : start + CHUNK])
        )
        for row in connection.execute(query).mappings():
            record = dict(row)
            changes.append((record, contribution(record, costs[record["id"]] - (record["current"] or 0), calls=0)))
    add(connection, changes)


def _value(row: Mapping[str, Any], name: str) -> Any:
    if name == "priced_model":
        return row["model"] if row["response_model"] is None else row["response_model"]
    return row[name]


def _combine(kind: Combine, old: Any, new: Any) -> Any:
    # NULL is "none yet": a money total while no call had a price, a first or last call of no calls.
    if old is None or new is None:
        return new if old is None else old
    if kind in ("sum", "money"):
        return old + new
    return min(old, new) if kind == "min" else max(old, new)


def _day_of(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@lru_cache(maxsize=65536)
def group_key(values: tuple[Any, ...]) -> str:
    """The key of one group's values: 128 bits of BLAKE2b over their `repr` (which keeps NULL apart from any text,
    and escapes what UTF-8 cannot hold)."""
    return hashlib.blake2b(repr(values).encode(), digest_size=16).hexdigest()


def _upsert(
    connection: Connection, table: Table, names: tuple[str, ...], totals: Mapping[tuple[Any, ...], list[Any]]
) -> None:
    """Add `(grain, day, *group) -> totals` to a rollup's rows, creating those it lacks."""
    columns = ("grain", "day", "group_key", *names, *MEASURE_NAMES)
    when, money = binders(connection.dialect)
    days: dict[datetime, Any] = {}
    rows = []
    for (grain, day, *values), sums in totals.items():
        bound = list(sums)
        for index in _MONEY:
            bound[index] = money(bound[index])
        for index in (*_FIRSTS, *_LASTS):
            bound[index] = when(bound[index])
        if day not in days:
            days[day] = when(day)
        rows.append((grain, days[day], group_key(tuple(values)), *values, *bound))
    # Sorted by key, so two writers upserting the same groups take their row locks in the same order.
    rows.sort(key=lambda row: row[:3])
    insert_rows(connection, table, columns, rows, suffix=_on_conflict(connection.dialect, table.name), bound=True)


@lru_cache(maxsize=8)
def binders(dialect: Dialect) -> tuple[Callable[[datetime], Any], Callable[[Decimal | None], Any]]:
    """A rollup row's times and money as `UTCDateTime` and `Money` bind them for `dialect` (a test holds them to
    it), without their per-value dispatch: the writer binds five per row."""
    if dialect.name == "sqlite":

        def when(value: datetime) -> Any:
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

        def money(value: Decimal | None) -> Any:
            return None if value is None else str(value)

        return when, money
    return (lambda value: value.astimezone(UTC).replace(tzinfo=None)), (lambda value: value)


@lru_cache(maxsize=16)
def _on_conflict(dialect: Dialect, name: str) -> str:
    quote = dialect.identifier_preparer.quote
    sqlite = dialect.name == "sqlite"
    updates = []
    for measure in MEASURES:
        old, new = f"{quote(name)}.{quote(measure.name)}", f"excluded.{quote(measure.name)}"
        if measure.combine == "sum":
            combined = f"{old} + {new}"
        elif measure.combine == "money":
            # SQLite's money is decimal text, which `+` would add as floats.
            combined = f"decimal_add({old}, {new})" if sqlite else f"COALESCE({old} + {new}, {old}, {new})"
        else:
            function = {"min": "min" if sqlite else "LEAST", "max": "max" if sqlite else "GREATEST"}[measure.combine]
            combined = f"{function}({old}, {new})"
        updates.append(f"{quote(measure.name)} = {combined}")
    return f" ON CONFLICT (day, grain, group_key) DO UPDATE SET {', '.join(updates)}"


Grain = Literal["month", "day", "records"]


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of time a read covers, and where its totals are: month rows, day rows, or the records."""

    start: datetime | None
    end: datetime | None
    grain: Grain


class PrunedSpan(ValueError):
    """A read bounded inside a day whose records were pruned: only whole days remain (in the rollups)."""


def spans(connection: Connection, since: datetime | None, until: datetime | None, *, months: bool) -> list[Span]:
    """[since, until) as whole months (when `months`), whole days, and at either end the part of a day it starts
    or ends inside; None is open-ended (the rows of the current day and month hold what happened so far)."""
    if since is not None and until is not None and since >= until:
        return []
    first = None if since is None else _ceiling(since, _day_of)
    last = None if until is None else _day_of(until)
    if first is not None and last is not None and first > last:
        found = [Span(since, until, "records")]
    else:
        found = [] if since is None or first == since else [Span(since, first, "records")]
        found += _whole_days(first, last, months)
        found += [] if until is None or last == until else [Span(last, until, "records")]
    ragged = [span for span in found if span.grain == "records"]
    if ragged:
        cut = checkpoints.latest(connection)
        if cut is not None and any(span.start is None or span.start < cut.before for span in ragged):
            raise PrunedSpan(
                f"the records before {cut.before.date().isoformat()} were pruned: only whole UTC days before it can be "
                "read (give dates or midnights)"
            )
    return found


def _whole_days(first: datetime | None, last: datetime | None, months: bool) -> list[Span]:
    """[first, last) between midnights: the whole months in it as month rows, the days around them as day rows."""
    if first is not None and last is not None and first >= last:
        return []
    if not months:
        return [Span(first, last, "day")]
    month_from = None if first is None else _ceiling(first, _month_of)
    month_to = None if last is None else _month_of(last)
    if month_from is not None and month_to is not None and month_from >= month_to:
        return [Span(first, last, "day")]
    found = [] if first is None or month_from == first else [Span(first, month_from, "day")]
    found.append(Span(month_from, month_to, "month"))
    return found + ([] if last is None or month_to == last else [Span(month_to, last, "day")])


def _ceiling(instant: datetime, floor: Callable[[datetime], datetime]) -> datetime:
    """The first boundary (of `floor`'s kind) at or after `instant`."""
    below = floor(instant)
    return below if below == instant else floor(below + timedelta(days=32) if floor is _month_of else below + ONE_DAY)


def _month_of(instant: datetime) -> datetime:
    return _day_of(instant).replace(day=1)


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
    kinds = {measure.name: measure for measure in MEASURES}
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for span in spans(connection, since, until, months="day" not in groups and table.name in MONTHLY):
        query = totals(span, table, groups, measures, sqlite, where=where)
        for result in connection.execute(query):
            group, values = tuple(result[: len(groups)]), result[len(groups) :]
            typed = {name: _typed(kinds[name], value) for name, value in zip(measures, values, strict=True)}
            if group not in found:
                found[group] = typed
                continue
            sums = found[group]
            for name, value in typed.items():
                sums[name] = _combine(kinds[name].combine, sums[name], value)
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
    by_name = {measure.name: measure for measure in MEASURES}
    keys = [_column(span, table, name, sqlite).label(name) for name in groups]
    money = func.decimal_sum if sqlite else func.sum
    aggregates = []
    for name in measures:
        measure = by_name[name]
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
            _upsert(connection, table, names, counted)
            written += len(counted)
        if table.name in MONTHLY:
            months = _months_of_days(connection, table)
            _upsert(connection, table, names, months)
            written += len(months)
    return written


def _days(connection: Connection, since: datetime | None) -> list[datetime]:
    """The UTC days with records from `since` on."""
    query = select(func.min(UsageRow.started_at), func.max(UsageRow.started_at))
    if since is not None:
        query = query.where(UsageRow.started_at >= since)
    first, last = connection.execute(query).one()
    if first is None:
        return []
    day, found = _day_of(first), []
    while day <= last:
        found.append(day)
        day += ONE_DAY
    return found


def recount(connection: Connection, table: Table, day: datetime) -> dict[tuple[Any, ...], list[Any]]:
    """A rollup's day rows for `day` as the records sum them: ("day", day, *group) -> totals."""
    sqlite = connection.dialect.name == "sqlite"
    names = dimensions(table)
    query = totals(Span(day, day + ONE_DAY, "records"), table, [*names], MEASURE_NAMES, sqlite)
    found: dict[tuple[Any, ...], list[Any]] = {}
    for result in connection.execute(query):
        sums = [_typed(measure, value) for measure, value in zip(MEASURES, result[len(names) :], strict=True)]
        found[("day", day, *result[: len(names)])] = sums
    return found


def _months_of_days(
    connection: Connection, table: Table, month: datetime | None = None
) -> dict[tuple[Any, ...], list[Any]]:
    """Month rows as the day rows sum them (of one `month`, or all): ("month", month, *group) -> totals."""
    found: dict[tuple[Any, ...], list[Any]] = {}
    for (_, day, *group), sums in _stored(connection, table, "day", month).items():
        _merge(found, ("month", day.replace(day=1), *group), sums)
    return found


def _typed(measure: Measure, value: Any) -> Any:
    if measure.combine == "sum":
        return int(value or 0)
    if value is None or measure.combine == "money":
        return None if value is None else Decimal(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
        query = query.where(table.c.day >= month, table.c.day < _ceiling(month + ONE_DAY, _month_of))
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
        found[key] = [_typed(measure, value) for measure, value in zip(MEASURES, sums, strict=True)]
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
