"""What each dashboard page shows, read from the ledger (blocking; run in a thread).

Spend comes from the same rollups as `spendgate report` (`proxy/ledger/reports.py`), for the team's current
budget period, so the page and the command agree to the digit, and a page costs days x groups, not records.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from markupsafe import Markup
from sqlalchemy import Engine, select

from proxy.ledger.counters import TOTAL_PERIOD_START
from proxy.ledger.end_users import UserView, list_users
from proxy.ledger.export import iter_usage
from proxy.ledger.reports import (
    TOKEN_KINDS,
    PriceFallback,
    ReportRow,
    SessionSpend,
    daily_spend,
    price_fallbacks,
    report,
    spend_of,
    top_sessions,
)
from proxy.ledger.rollup_reads import read
from proxy.ledger.schema import AuditHead
from proxy.ledger.teams import TeamView, get_team, list_teams
from proxy.ledger.windows import period_end
from proxy.pricing.table import PriceTable
from proxy.reconcile.scheduled import DayResult, recent
from proxy.surfaces.dashboard import charts
from proxy.surfaces.dashboard.forecast import Forecast, forecast

ZERO = Decimal(0)
TOP = 10
LATEST = 25


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamOutlook:
    """One team on the overview."""

    team: TeamView
    since: datetime  # the start of its current period (the start of time for `total`)
    until: datetime | None  # the end of the period
    spent: Decimal  # this period, as `spendgate report` sums it
    remaining: Decimal | None
    forecast: Forecast
    daily: dict[date, Decimal]

    @property
    def risk(self) -> float:
        """Projected spend as a share of the budget (spent and held for a budget that never ends); teams without
        a budget come last."""
        budget = self.team.budget_usd
        if budget is None:
            return -1.0
        projected = self.forecast.projected_usd
        expected = projected if projected is not None else self.spent + self.team.reserved_usd
        return float(expected / budget) if budget > 0 else float("inf")


def outlooks(engine: Engine, prices: PriceTable, now: datetime, *, name: str | None = None) -> list[TeamOutlook]:
    """Every team (or one) with its spend this period and its forecast, riskiest first."""
    teams = [get_team(engine, name, now=now)] if name is not None else list_teams(engine, now=now)
    if not teams:
        return []
    earliest = min(team.period_start or TOTAL_PERIOD_START for team in teams)
    daily_by_team: dict[str | None, dict[date, Decimal]] = defaultdict(dict)
    for (team_name, day), cost in daily_spend(engine, since=earliest, team=name).items():
        daily_by_team[team_name][date.fromisoformat(day)] = cost
    found = []
    for team in teams:
        since = team.period_start or TOTAL_PERIOD_START
        until = period_end(team.period, since) if team.period_start else None
        daily = {day: cost for day, cost in daily_by_team[team.name].items() if day >= since.date()}
        spent = sum(daily.values(), ZERO)
        outlook = forecast(
            daily,
            spent=spent,
            held=team.reserved_usd,
            budget=team.budget_usd,
            period_start=since,
            period_end=until,
            now=now,
        )
        remaining = None if team.budget_usd is None else team.budget_usd - spent - team.reserved_usd
        found.append(
            TeamOutlook(
                team=team, since=since, until=until, spent=spent, remaining=remaining, forecast=outlook, daily=daily
            )
        )
    return sorted(found, key=lambda o: (-o.risk, o.team.name))


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamPage:
    """Everything on one team's page."""

    outlook: TeamOutlook
    totals: ReportRow
    daily_chart: Markup
    to_date_chart: Markup
    models: list[tuple[str, str]]  # legend: (model, colour)
    top: dict[str, list[ReportRow]]  # by feature, user and key: the most expensive first
    sessions: list[SessionSpend]  # the most expensive agent sessions first
    users: list[UserView]  # with end-user budgets: the users nearest their allowance first
    latest: list[dict[str, Any]]


def team_page(engine: Engine, prices: PriceTable, name: str, now: datetime) -> TeamPage:
    """One team's period: daily spend by model, the budget and its forecast, where the money went."""
    [outlook] = outlooks(engine, prices, now, name=name)
    since = outlook.since
    by_day_model = report(engine, prices, by=["day", "model"], since=since, team=name)
    if outlook.team.period_start is not None:
        start = since.date()
    else:  # a budget that never ends: from the first day with spend
        start = min((date.fromisoformat(row.group["day"] or "") for row in by_day_model), default=now.date())
    shown_days = [start + timedelta(days=n) for n in range((now.date() - start).days + 1)]
    cost_by_model: dict[str, Decimal] = defaultdict(Decimal)
    for row in by_day_model:
        cost_by_model[row.group["model"] or "unknown"] += row.cost_usd
    models = sorted(cost_by_model, key=lambda m: -cost_by_model[m])
    series = {model: [ZERO] * len(shown_days) for model in models}
    index = {day: i for i, day in enumerate(shown_days)}
    for row in by_day_model:
        day = date.fromisoformat(row.group["day"] or "")
        if day in index:
            series[row.group["model"] or "unknown"][index[day]] += row.cost_usd
    cumulative, running = [], ZERO
    for day in shown_days:
        running += outlook.daily.get(day, ZERO)
        cumulative.append(running)
    projected = outlook.forecast
    band = (
        (projected.projected_low or ZERO, projected.projected_usd, projected.projected_high or ZERO)
        if projected.projected_usd is not None
        else None
    )
    totals = report(engine, prices, by=[], since=since, team=name)
    top = {
        group: sorted(report(engine, prices, by=[group], since=since, team=name), key=lambda r: -r.cost_usd)[:TOP]
        for group in ("feature", "user", "key")
    }
    latest = [record for _, record in iter_usage(engine, team=name, limit=LATEST, newest_first=True)]
    users = list_users(engine, name, now=now)
    if outlook.team.user_budget_usd is None and not any(view.own_budget for view in users):
        users = []
    return TeamPage(
        outlook=outlook,
        totals=totals[0] if totals else ReportRow(group={}, tokens=dict.fromkeys(TOKEN_KINDS, 0)),
        daily_chart=charts.stacked_days(shown_days, series, title=f"Daily spend of team {name} by model"),
        to_date_chart=charts.to_date(
            shown_days, cumulative, budget=outlook.team.budget_usd, forecast=band, title=f"Spend of team {name} to date"
        ),
        models=[(model, charts.colour(i)) for i, model in enumerate(models)],
        top=top,
        sessions=top_sessions(engine, team=name, since=since, limit=TOP),
        users=sorted(users, key=_nearest_allowance)[:TOP],
        latest=latest,
    )


def _nearest_allowance(view: UserView) -> tuple[Decimal, str]:
    """Users with the least of their allowance left first (those without a limit last)."""
    if view.budget_usd is None or view.remaining_usd is None:
        return Decimal("Infinity"), view.user
    share = view.remaining_usd / view.budget_usd if view.budget_usd else Decimal(0)
    return share, view.user


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerPage:
    """The ledger's health."""

    head_pos: int
    head_hash: str
    interrupted: int
    fallbacks: list[PriceFallback]  # the price table is stale
    set_aside: int
    reconciled: list[DayResult]  # the scheduled reconciliation's latest days, newest first


def ledger_page(engine: Engine, spill_dir: Path) -> LedgerPage:
    """The audit chain's head, interrupted calls, calls the price table could not price exactly, records set
    aside on disk."""
    with engine.connect() as connection:
        head_pos, head_hash = connection.execute(select(AuditHead.pos, AuditHead.hash).where(AuditHead.id == 1)).one()
        [totals] = read(connection, groups=[], measures=["interrupted_calls"], since=None, until=None).values()
    interrupted = totals["interrupted_calls"]
    set_aside = 0
    for path in sorted(spill_dir.glob("refused-*.jsonl")) if spill_dir.is_dir() else ():
        with path.open("rb") as lines:
            set_aside += sum(1 for line in lines if line.strip())
    return LedgerPage(
        head_pos=head_pos,
        head_hash=head_hash,
        interrupted=interrupted,
        fallbacks=price_fallbacks(engine),
        set_aside=set_aside,
        reconciled=recent(engine),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MySpend:
    """One person's spend in one of their teams: this period against their allowance, and today."""

    team: TeamView
    calls: int
    today_usd: Decimal
    allowance: UserView | None  # None: no calls and no allowance of theirs this period


def my_spend(engine: Engine, subject: str, teams: tuple[str, ...], now: datetime) -> list[MySpend]:
    """The person `subject`'s calls and spend in each of `teams` (the teams they belong to or have keys on)."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    found = []
    for name in teams:
        team = get_team(engine, name, now=now)
        since = team.period_start or TOTAL_PERIOD_START
        mine = {"team": name, "user": subject}
        [(calls, _)] = spend_of(engine, by=[], since=since, where=mine).values()
        [(_, spent_today)] = spend_of(engine, by=[], since=today, where=mine).values()
        views = list_users(engine, name, now=now, only=[subject])
        found.append(MySpend(team=team, calls=calls, today_usd=spent_today, allowance=views[0] if views else None))
    return found
