"""Spend reports: usage records aggregated in SQL, grouped by team, model, feature, user, session, agent, key and day.

Money is summed exactly: NUMERIC `sum()` on PostgreSQL, and on SQLite (whose money column holds decimal
text) a `decimal_sum` aggregate that `proxy.ledger.db` registers on every connection. Cache and batch savings are
derived per model from the token sums and the price table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Engine, Float, case, cast, func, select

from proxy.ledger.schema import UsageRow, effective_cost
from proxy.pricing.cost import WEB_SEARCH_USD
from proxy.pricing.table import PriceTable
from proxy.types import GROUPS, TOKEN_KIND_FIELDS

# The usage columns reports total.
TOKEN_KINDS = (*TOKEN_KIND_FIELDS.values(), "web_search_requests")
MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


@dataclass(slots=True, kw_only=True)
class ReportRow:
    """The totals of one group."""

    group: dict[str, str | None]
    calls: int = 0
    tokens: dict[str, int]
    cost_usd: Decimal = ZERO
    retries: int = 0
    retry_cost_usd: Decimal = ZERO
    unpriced_calls: int = 0
    family_priced_calls: int = 0
    cache_savings_usd: Decimal = ZERO
    batch_savings_usd: Decimal = ZERO

    def to_json(self) -> dict[str, Any]:
        """A flat JSON-ready dict: group fields first, money as exact decimal strings."""
        share = self.retry_cost_usd / self.cost_usd if self.cost_usd else ZERO
        return {
            **self.group,
            "calls": self.calls,
            **self.tokens,
            "cost_usd": _plain(self.cost_usd),
            "retries": self.retries,
            "retry_cost_usd": _plain(self.retry_cost_usd),
            "retry_share": _plain(round(share, 4)),
            "unpriced_calls": self.unpriced_calls,
            "family_priced_calls": self.family_priced_calls,
            "cache_savings_usd": _plain(self.cache_savings_usd),
            "batch_savings_usd": _plain(self.batch_savings_usd),
        }


def report(
    engine: Engine,
    prices: PriceTable,
    *,
    by: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
    team: str | None = None,
) -> list[ReportRow]:
    """Totals per group, ordered by group; `by` is any of `GROUPS` (none: one grand total); `team`: only its
    records."""
    unknown = [name for name in by if name not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    sqlite = engine.dialect.name == "sqlite"
    keys = [_group_column(name, sqlite) for name in by]
    # Savings depend on the model's prices, so the SQL groups by the served model too; rows are merged after.
    priced_model = func.coalesce(UsageRow.response_model, UsageRow.model)
    money = func.decimal_sum if sqlite else func.sum
    is_batch = UsageRow.service_tier == "batch"
    cost = effective_cost()
    query = select(
        *keys,
        priced_model,
        func.count(),
        *[func.sum(getattr(UsageRow, kind)) for kind in TOKEN_KINDS],
        money(cost),
        func.sum(case((UsageRow.is_retry, 1), else_=0)),
        money(case((UsageRow.is_retry, cost), else_=None)),
        func.sum(case((UsageRow.price_source == "unpriced", 1), else_=0)),
        func.sum(case((UsageRow.price_source == "family", 1), else_=0)),
        money(case((is_batch, cost), else_=None)),
        func.sum(case((is_batch, UsageRow.web_search_requests), else_=0)),
    ).group_by(*keys, priced_model)
    if since is not None:
        query = query.where(UsageRow.started_at >= since)
    if until is not None:
        query = query.where(UsageRow.started_at < until)
    if team is not None:
        query = query.where(UsageRow.team == team)
    at = until or datetime.now(UTC)
    rows: dict[tuple[Any, ...], ReportRow] = {}
    with engine.connect() as connection:
        for result in connection.execute(query):
            group = tuple(_text(value) for value in result[: len(keys)])
            values = result[len(keys) :]
            model_id, calls, *tokens = values[:8]
            cost, retries, retry_cost, unpriced, family, batch_cost, batch_searches = values[8:]
            row = rows.setdefault(
                group,
                ReportRow(group=dict(zip(by, group, strict=True)), tokens=dict.fromkeys(TOKEN_KINDS, 0)),
            )
            row.calls += calls
            for kind, count in zip(TOKEN_KINDS, tokens, strict=True):
                row.tokens[kind] += int(count or 0)
            row.cost_usd += _decimal(cost)
            row.retries += int(retries or 0)
            row.retry_cost_usd += _decimal(retry_cost)
            row.unpriced_calls += int(unpriced or 0)
            row.family_priced_calls += int(family or 0)
            row.cache_savings_usd += _cache_savings(prices, model_id, dict(zip(TOKEN_KINDS, tokens, strict=True)), at)
            # Batch halves every token charge, so what the batch tokens cost is exactly what batch saved.
            row.batch_savings_usd += _decimal(batch_cost) - WEB_SEARCH_USD * int(batch_searches or 0)
    return [rows[group] for group in sorted(rows, key=lambda g: tuple("" if v is None else v for v in g))]


def daily_spend(engine: Engine, *, since: datetime, team: str | None = None) -> dict[tuple[str | None, str], Decimal]:
    """Spend per (team, UTC day) from `since`: the `cost_usd` of `report(by=["team", "day"])` alone, summed the
    same exact way, from a covering index (for pages that need nothing else)."""
    sqlite = engine.dialect.name == "sqlite"
    day = _group_column("day", sqlite)
    money = func.decimal_sum if sqlite else func.sum
    query = (
        select(UsageRow.team, day, money(effective_cost()))
        .where(UsageRow.started_at >= since, effective_cost().is_not(None))
        .group_by(UsageRow.team, day)
    )
    if team is not None:
        query = query.where(UsageRow.team == team)
    with engine.connect() as connection:
        return {(name, when): _decimal(cost) for name, when, cost in connection.execute(query)}


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSpend:
    """One agent session of a team over a period."""

    session: str
    user: str | None  # whose session it was; None when its calls named no user, or several
    users: int  # how many distinct users its calls named
    calls: int
    cost_usd: Decimal
    last_seen: datetime


def top_sessions(engine: Engine, *, team: str, since: datetime, limit: int) -> list[SessionSpend]:
    """A team's `limit` most expensive sessions since `since`, dearest first (calls without a session left out)."""
    sqlite = engine.dialect.name == "sqlite"
    cost = effective_cost()
    # SQLite's money is decimal text, which sorts as text: ranked by its float value (the sum shown stays exact).
    rank = func.sum(cast(cost, Float)) if sqlite else func.sum(cost)
    query = (
        select(
            UsageRow.session,
            func.min(UsageRow.user),
            # Calls without a user are one more "user": a session of ann's and anonymous calls is not all ann's.
            func.count(func.coalesce(UsageRow.user, "").distinct()),
            func.count(),
            (func.decimal_sum if sqlite else func.sum)(cost),
            func.max(UsageRow.started_at),
        )
        .where(UsageRow.team == team, UsageRow.session.is_not(None), UsageRow.started_at >= since)
        .group_by(UsageRow.session)
        .order_by(rank.desc().nulls_last(), UsageRow.session)
        .limit(limit)
    )
    with engine.connect() as connection:
        return [
            SessionSpend(
                session=session,
                user=user if users == 1 else None,
                users=users,
                calls=calls,
                cost_usd=_decimal(spent),
                last_seen=last,
            )
            for session, user, users, calls, spent, last in connection.execute(query)
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceFallback:
    """A model the price table could not price exactly, and its calls over a period."""

    model: str
    price_source: str  # "family" (priced as its family's newest model) or "unpriced" (cost null)
    calls: int
    first_seen: datetime
    last_seen: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "model": self.model,
            "price_source": self.price_source,
            "calls": self.calls,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
        }


def price_fallbacks(
    engine: Engine, *, since: datetime | None = None, until: datetime | None = None
) -> list[PriceFallback]:
    """Models seen in the ledger whose price came from a family fallback or nowhere, most calls first."""
    model = func.coalesce(UsageRow.response_model, UsageRow.model)
    query = (
        select(model, UsageRow.price_source, func.count(), func.min(UsageRow.started_at), func.max(UsageRow.started_at))
        .where(UsageRow.price_source.in_(("family", "unpriced")))
        .group_by(model, UsageRow.price_source)
        .order_by(func.count().desc(), model)
    )
    if since is not None:
        query = query.where(UsageRow.started_at >= since)
    if until is not None:
        query = query.where(UsageRow.started_at < until)
    with engine.connect() as connection:
        return [
            PriceFallback(model=name or "unknown", price_source=source, calls=calls, first_seen=first, last_seen=last)
            for name, source, calls, first, last in connection.execute(query)
        ]


def _group_column(name: str, sqlite: bool) -> ColumnElement[Any]:
    if name == "day":
        day = func.date(UsageRow.started_at) if sqlite else func.to_char(UsageRow.started_at, "YYYY-MM-DD")
        return day.label("day")
    columns = {
        "team": UsageRow.team,
        "model": UsageRow.model,
        "feature": UsageRow.feature,
        "user": UsageRow.user,
        "session": UsageRow.session,
        "agent": UsageRow.agent,
    }
    return columns.get(name, UsageRow.key_id).label(name)


def _cache_savings(prices: PriceTable, model: str | None, tokens: dict[str, Any], at: datetime) -> Decimal:
    """What cache reads saved against paying full input price, net of what cache writes cost above it."""
    found = prices.lookup(model or "", at)
    if found is None:
        return ZERO
    rates = found[0].standard
    saved = int(tokens["cache_read_input_tokens"] or 0) * (rates.input - rates.cache_read)
    premium = int(tokens["cache_creation_5m_input_tokens"] or 0) * (rates.cache_write_5m - rates.input)
    premium += int(tokens["cache_creation_1h_input_tokens"] or 0) * (rates.cache_write_1h - rates.input)
    return (saved - premium) / MILLION


def _decimal(value: Any) -> Decimal:
    return ZERO if value is None else Decimal(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _plain(value: Decimal) -> str:
    return format(value.normalize() if value else ZERO, "f")
