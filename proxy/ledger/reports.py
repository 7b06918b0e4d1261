"""Spend reports: usage totals grouped by team, model, feature, user, session, agent, key and day.

They are read from the rollups (`proxy.ledger.rollups`), so a report costs days x groups whatever the number of
records. Money is summed exactly: NUMERIC `sum()` on PostgreSQL, and on SQLite (whose money column holds decimal
text) a `decimal_sum` aggregate that `proxy.ledger.db` registers on every connection. Cache and batch savings are
derived per model from the token sums and the price table.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from proxy.ledger.rollup_reads import Group, first_groups, group_order, read
from proxy.pricing.cost import WEB_SEARCH_USD
from proxy.pricing.table import PriceTable
from proxy.pricing.versions import ModelPrice
from proxy.types import GROUPS, TOKEN_KIND_FIELDS, PriceSource

# The usage columns reports total.
TOKEN_KINDS = (*TOKEN_KIND_FIELDS.values(), "web_search_requests")
# The rollup totals a report reads.
REPORTED = (
    "calls",
    *TOKEN_KINDS,
    "cost_usd",
    "retries",
    "retry_cost_usd",
    "unpriced_calls",
    "family_priced_calls",
    "batch_cost_usd",
    "batch_web_search_requests",
)
# Groups in a page of a report: when a cursor comes without a limit, and at most.
REPORT_PAGE, MAX_REPORT_PAGE = 100, 1000
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


@dataclass(frozen=True, slots=True)
class ReportPage:
    """One page of a report: its rows, and the cursor of the next page (None on the last)."""

    rows: list[ReportRow]
    next_cursor: str | None


def report(
    engine: Engine,
    prices: PriceTable,
    *,
    by: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
    team: str | None = None,
) -> list[ReportRow]:
    """Totals per group, ordered by group (`rollup_reads.group_order`); `by` is any of `GROUPS` (none: one grand
    total); `team`: only its records. Read from the rollups (whole months and days) and the records (a day the
    bounds cut)."""
    _check(by)
    return _rows(_read(engine, **_query(by, since, until, team)), by, prices, until)


def report_page(
    engine: Engine,
    prices: PriceTable,
    *,
    by: Sequence[str],
    limit: int,
    cursor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    team: str | None = None,
) -> ReportPage:
    """`limit` (1 to `MAX_REPORT_PAGE`) rows of `report` from the group after `cursor` (a `next_cursor` of the
    same report), reading the totals of those groups alone: a page costs its own groups' rows, at the first group
    as at the millionth. A ValueError when the limit is out of bounds or the cursor is not one a report gave."""
    _check(by)
    if not 1 <= limit <= MAX_REPORT_PAGE:
        raise ValueError(f"'limit' {limit}: a page holds 1 to {MAX_REPORT_PAGE} groups")
    after = None if cursor is None else _decode_cursor(cursor, len(by))
    if not by:
        # One grand total: a single row, and no next page.
        return ReportPage(rows=report(engine, prices, by=by, since=since, until=until, team=team), next_cursor=None)
    query = _query(by, since, until, team)
    with engine.connect() as connection:
        # A group whose first call is written between the two reads, inside this page's range, is on this page
        # (one row past `limit`), never skipped: the next page starts after this page's last group.
        groups = first_groups(
            connection, groups=by, since=since, until=until, where=query["where"], after=after, limit=limit + 1
        )
        page = groups[:limit]
        found = read(connection, **query, after=after, through=page[-1]) if page else {}
    rows = _rows(found, by, prices, until)
    return ReportPage(rows=rows, next_cursor=_encode_cursor(page[-1]) if len(groups) > limit else None)


def _check(by: Sequence[str]) -> None:
    unknown = [name for name in by if name not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUPS)}")


def _query(by: Sequence[str], since: datetime | None, until: datetime | None, team: str | None) -> dict[str, Any]:
    # Savings depend on the model's prices, so totals are read by the served model too; rows are merged after.
    return {
        "groups": [*by, "priced_model"],
        "measures": REPORTED,
        "since": since,
        "until": until,
        "where": {} if team is None else {"team": team},
    }


def _rows(
    found: dict[tuple[Any, ...], dict[str, Any]], by: Sequence[str], prices: PriceTable, until: datetime | None
) -> list[ReportRow]:
    """Report rows of totals read by `[*by, "priced_model"]`, in group order."""
    at = until or datetime.now(UTC)
    rows: dict[tuple[Any, ...], ReportRow] = {}
    # Each model's prices, looked up once: a report by session has a row per session and model.
    found_prices: dict[str | None, tuple[ModelPrice, PriceSource] | None] = {}
    for key, totals in found.items():
        group, model_id = tuple(_text(value) for value in key[:-1]), key[-1]
        row = rows.setdefault(
            group, ReportRow(group=dict(zip(by, group, strict=True)), tokens=dict.fromkeys(TOKEN_KINDS, 0))
        )
        tokens = {kind: totals[kind] for kind in TOKEN_KINDS}
        row.calls += totals["calls"]
        for kind, count in tokens.items():
            row.tokens[kind] += count
        row.cost_usd += totals["cost_usd"] or ZERO
        row.retries += totals["retries"]
        row.retry_cost_usd += totals["retry_cost_usd"] or ZERO
        row.unpriced_calls += totals["unpriced_calls"]
        row.family_priced_calls += totals["family_priced_calls"]
        if model_id not in found_prices:
            found_prices[model_id] = prices.lookup(model_id or "", at)
        row.cache_savings_usd += _cache_savings(found_prices[model_id], tokens)
        # Batch halves every token charge, so what the batch tokens cost is exactly what batch saved.
        batch_cost = totals["batch_cost_usd"] or ZERO
        row.batch_savings_usd += batch_cost - WEB_SEARCH_USD * totals["batch_web_search_requests"]
    return [rows[group] for group in sorted(rows, key=group_order)]


def _encode_cursor(group: Group) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(group)).encode()).decode()


def _decode_cursor(cursor: str, width: int) -> Group:
    try:
        group = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, RecursionError):
        group = None
    if not (isinstance(group, list) and 0 < len(group) == width and all(map(_storable, group))):
        raise ValueError("'cursor' is not one this report returned (the same groups, from its next_cursor)")
    return tuple(group)


def daily_spend(engine: Engine, *, since: datetime, team: str | None = None) -> dict[tuple[str | None, str], Decimal]:
    """Spend per (team, UTC day) from `since`: the `cost_usd` of `report(by=["team", "day"])` alone (days with no
    priced call left out)."""
    found = _read(
        engine,
        groups=["team", "day"],
        measures=["cost_usd"],
        since=since,
        until=None,
        where={} if team is None else {"team": team},
    )
    return {(name, day): totals["cost_usd"] for (name, day), totals in found.items() if totals["cost_usd"] is not None}


def spend_of(
    engine: Engine, *, by: Sequence[str], since: datetime, where: dict[str, str]
) -> dict[tuple[Any, ...], tuple[int, Decimal]]:
    """Calls and spend per group of `by` from `since`, of the records whose dimensions equal `where`'s values."""
    found = _read(engine, groups=by, measures=["calls", "cost_usd"], since=since, until=None, where=where)
    return {group: (totals["calls"], totals["cost_usd"] or ZERO) for group, totals in found.items()}


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
    found = _read(
        engine,
        groups=["session", "user"],
        measures=["calls", "cost_usd", "last_started_at"],
        since=since,
        until=None,
        where={"team": team},
    )
    # Calls without a user are one more "user": a session of ann's and anonymous calls is not all ann's.
    users: dict[str, list[str | None]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    spent: dict[str, Decimal] = defaultdict(Decimal)
    last: dict[str, datetime] = {}
    for (session, user), totals in found.items():
        if session is None:
            continue
        users[session].append(user)
        calls[session] += totals["calls"]
        spent[session] += totals["cost_usd"] or ZERO
        last[session] = max(last.get(session, totals["last_started_at"]), totals["last_started_at"])
    ranked = sorted(users, key=lambda session: (-spent[session], session))[:limit]
    return [
        SessionSpend(
            session=session,
            user=users[session][0] if len(users[session]) == 1 else None,
            users=len(users[session]),
            calls=calls[session],
            cost_usd=spent[session],
            last_seen=last[session],
        )
        for session in ranked
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
    found = _read(
        engine,
        groups=["priced_model", "price_source"],
        measures=["calls", "first_started_at", "last_started_at"],
        since=since,
        until=until,
    )
    fallbacks = [
        PriceFallback(
            model=model or "unknown",
            price_source=source,
            calls=totals["calls"],
            first_seen=totals["first_started_at"],
            last_seen=totals["last_started_at"],
        )
        for (model, source), totals in found.items()
        if source in ("family", "unpriced")
    ]
    return sorted(fallbacks, key=lambda fallback: (-fallback.calls, fallback.model))


def _read(engine: Engine, **query: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
    """`rollup_reads.read` on a connection of its own."""
    with engine.connect() as connection:
        return read(connection, **query)


def _storable(value: object) -> bool:
    """A group value a ledger can hold: NULL, or text with no NUL and no lone surrogate."""
    if value is None:
        return True
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _cache_savings(found: tuple[ModelPrice, PriceSource] | None, tokens: dict[str, Any]) -> Decimal:
    """What cache reads saved against paying full input price (`found`: the model's `PriceTable.lookup`), net of
    what cache writes cost above it."""
    if found is None:
        return ZERO
    rates = found[0].standard
    saved = int(tokens["cache_read_input_tokens"] or 0) * (rates.input - rates.cache_read)
    premium = int(tokens["cache_creation_5m_input_tokens"] or 0) * (rates.cache_write_5m - rates.input)
    premium += int(tokens["cache_creation_1h_input_tokens"] or 0) * (rates.cache_write_1h - rates.input)
    return (saved - premium) / MILLION


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _plain(value: Decimal) -> str:
    return format(value.normalize() if value else ZERO, "f")
