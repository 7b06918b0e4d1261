"""Rollups: the usage records' totals by UTC day and month and by group, kept in the records' own write transaction.

Three tables hold the same totals (`MEASURES`) by three sets of groups (`schema.TeamRollup`, `UserRollup`,
`SessionRollup`), each by day and (but sessions) by calendar month (`grain`). This module is what a total is and
how the writer (`add`) and a reprice (`correct`) add to them; `rollup_reads` reads them (months and days x groups,
never a scan of the records), `rollup_checks` rebuilds and recounts them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Dialect, Table, case, func, literal, select

from proxy.ledger.db import insert_rows
from proxy.ledger.schema import SessionRollup, TeamRollup, UsageRow, UserRollup, effective_cost
from proxy.ledger.windows import calendar_start

Combine = Literal["sum", "money", "min", "max"]
Grain = Literal["month", "day", "records"]
ROLLUPS: tuple[Table, ...] = (TeamRollup.__table__, UserRollup.__table__, SessionRollup.__table__)  # type: ignore[assignment]
# The rollups with month rows besides day rows: a session seldom outlives its day, so its month rows would be as
# many as its day rows.
MONTHLY = frozenset(("rollup_teams", "rollup_users"))
# Group names as reports spell them, and the columns that hold them.
COLUMN_OF = {"key": "key_id"}
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
MEASURE_OF = {measure.name: measure for measure in MEASURES}
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
            day = calendar_start("day", row["started_at"])
            merge(totals, ("day", day, *group), values)
            if monthly:
                merge(totals, ("month", day.replace(day=1), *group), values)
        upsert(connection, table, names, totals)


def merge(totals: dict[tuple[Any, ...], list[Any]], key: tuple[Any, ...], values: Sequence[Any]) -> None:
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


def combine(kind: Combine, old: Any, new: Any) -> Any:
    # NULL is "none yet": a money total while no call had a price, a first or last call of no calls.
    if old is None or new is None:
        return new if old is None else old
    if kind in ("sum", "money"):
        return old + new
    return min(old, new) if kind == "min" else max(old, new)


@lru_cache(maxsize=65536)
def group_key(values: tuple[Any, ...]) -> str:
    """The key of one group's values: 128 bits of BLAKE2b over their `repr` (which keeps NULL apart from any text,
    and escapes what UTF-8 cannot hold)."""
    return hashlib.blake2b(repr(values).encode(), digest_size=16).hexdigest()


def upsert(
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


def typed(measure: Measure, value: Any) -> Any:
    """A total as the database gives it back (decimal text, naive times on SQLite) as Python holds it."""
    if measure.combine == "sum":
        return int(value or 0)
    if value is None or measure.combine == "money":
        return None if value is None else Decimal(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
