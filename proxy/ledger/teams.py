"""Teams: their budgets, periods and limits, each change with an audit entry, and each team read with its spend.
One implementation behind the CLI and the admin API, with proxy/ledger/key_admin.py (client keys) and
proxy/ledger/end_users.py (end users' budgets), which share the errors and `UNSET` defined here."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from proxy.ledger.audit import record_event
from proxy.ledger.budgets import recount, recount_users
from proxy.ledger.counters import current_spend, team_counter, team_counters
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import budget_columns
from proxy.ledger.schema import Team, UserBudget
from proxy.ledger.windows import (
    WINDOW_COLUMNS,
    WindowChange,
    WindowView,
    change_windows,
    named,
    to_recount,
    window_columns,
    window_views,
    windows_of,
)
from proxy.types import (
    BUDGET_EDGES,
    CAP_POLICIES,
    UNSET,
    BudgetEdge,
    CapPolicy,
    Period,
    RateLimits,
    Unset,
    Windows,
    usd,
)

# Rate limits are INTEGER columns.
MAX_RATE = 2**31 - 1
# Team names travel in admin API paths and in every record: no spaces, slashes or look-alikes.
TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class NotFound(LookupError):
    """The named team or key does not exist."""


class Conflict(ValueError):
    """The team or key already exists."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamSettings:
    """What `teams create` / `teams update` may set. `UNSET` fields are left as they are."""

    budget_usd: Decimal | None | Unset = UNSET
    period: Period | Unset = UNSET
    max_output_tokens: int | None | Unset = UNSET
    cap_policy: CapPolicy | Unset = UNSET
    models: tuple[str, ...] | None | Unset = UNSET
    retry_window_seconds: int | Unset = UNSET
    user_budget_usd: Decimal | None | Unset = UNSET
    rpm: int | None | Unset = UNSET
    itpm: int | None | Unset = UNSET
    otpm: int | None | Unset = UNSET
    # The team's other budget windows, and each end user's (None in a window: no limit there).
    windows: Mapping[Period, Decimal | None] | None = None
    user_windows: Mapping[Period, Decimal | None] | None = None
    budget_edge: BudgetEdge | Unset = UNSET

    def __post_init__(self) -> None:
        # Checks the amounts, the period and the windows.
        self.team_change()
        self.user_change()
        check_rates(self.rpm, self.itpm, self.otpm)
        if not isinstance(self.budget_edge, Unset) and self.budget_edge not in BUDGET_EDGES:
            raise ValueError(f"budget edge must be one of {', '.join(BUDGET_EDGES)}, got {self.budget_edge!r}")
        if not isinstance(self.cap_policy, Unset) and self.cap_policy not in CAP_POLICIES:
            raise ValueError(f"cap policy must be one of {', '.join(CAP_POLICIES)}, got {self.cap_policy!r}")
        window = self.retry_window_seconds
        if not isinstance(window, Unset) and window < 0:
            raise ValueError(f"retry window must be 0 (off) or a number of seconds, got {window}")
        tokens = self.max_output_tokens
        if not isinstance(tokens, Unset) and tokens is not None and tokens < 1:
            raise ValueError(f"max output tokens must be at least 1, got {tokens}")

    def team_change(self) -> WindowChange:
        """What this says about the team's own budget windows."""
        return WindowChange(budget=self.budget_usd, period=self.period, windows=self.windows)

    def user_change(self) -> WindowChange:
        """What this says about each end user's budget windows (their shorthand follows the team's period)."""
        return WindowChange(budget=self.user_budget_usd, period=self.period, windows=self.user_windows)


def no_team(connection: Connection, name: str, *, create: bool = False) -> NotFound:
    """The error for a team name that does not exist, naming the existing teams it is close to (a typo is the
    likelier mistake); with `create`, also the command that makes a new team of that name."""
    names = connection.execute(select(Team.name)).scalars().all()
    close = difflib.get_close_matches(name, names, n=3)
    message = f"no team named {name!r}"
    if close:
        message += f" (did you mean {' or '.join(map(repr, close))}?)"
    if create:
        message += f"; create it with `spendgate teams create {name}`"
    return NotFound(message)


def check_rates(*limits: int | None | Unset) -> None:
    """Rate limits are whole numbers of at least 1 per minute (None: no limit)."""
    for limit in limits:
        if isinstance(limit, int) and not 1 <= limit <= MAX_RATE:
            raise ValueError(f"a rate limit must be from 1 to {MAX_RATE} per minute, got {limit}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamView:
    """A team as `teams list` shows it, with its spend in the current period."""

    name: str
    budget_usd: Decimal | None
    period: str
    max_output_tokens: int | None
    cap_policy: str
    models: tuple[str, ...] | None
    retry_window_seconds: int
    user_budget_usd: Decimal | None
    rates: RateLimits
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal | None
    period_start: datetime | None
    windows: tuple[WindowView, ...]  # every budgeted window, the shorthand's among them
    user_windows: Windows  # each end user's allowance per window (users with their own aside)
    budget_edge: BudgetEdge

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; money as exact decimal strings."""
        return {
            "name": self.name,
            "budget_usd": usd(self.budget_usd),
            "period": self.period,
            "max_output_tokens": self.max_output_tokens,
            "cap_policy": self.cap_policy,
            "models": list(self.models) if self.models is not None else None,
            "retry_window_seconds": self.retry_window_seconds,
            "user_budget_usd": usd(self.user_budget_usd),
            "rpm": self.rates.rpm,
            "itpm": self.rates.itpm,
            "otpm": self.rates.otpm,
            "spent_usd": usd(self.spent_usd),
            "reserved_usd": usd(self.reserved_usd),
            "remaining_usd": usd(self.remaining_usd),
            "period_start": self.period_start.isoformat() if self.period_start else None,
            "windows": [window.to_json() for window in self.windows],
            "user_windows": named(self.user_windows),
            "budget_edge": self.budget_edge,
        }


def create_team(engine: Engine, name: str, settings: TeamSettings, *, actor: str) -> TeamView:
    """Create a team; unset options take their defaults (no budget, monthly period, clamp policy).

    Every change here is written to the audit trail as `actor`, in the same transaction as the change.
    """
    if not TEAM_NAME.fullmatch(name):
        raise ValueError(
            f"team name {name!r} is not usable: 1 to 100 letters, digits, '-', '_' or '.', starting with a letter or "
            "digit (it appears in URLs of the admin API and in every record)"
        )
    now = datetime.now(UTC)
    team = Team(
        name=name,
        period="month",
        cap_policy="clamp",
        retry_window_seconds=600,
        budget_edge="refuse",
        created_at=now,
        updated_at=now,
    )
    _apply(team, settings)
    try:
        with write_transaction(engine) as connection:
            connection.execute(insert(Team).values(**_columns(team)))
            record_event(connection, actor=actor, action="team.create", target=name, after=_rules(team))
    except IntegrityError:
        raise Conflict(f"team {name!r} already exists; use `spendgate teams update` to change it") from None
    return get_team(engine, name)


def update_team(engine: Engine, name: str, settings: TeamSettings, *, actor: str) -> TeamView:
    """Change the given options of a team; options left `UNSET` keep their value."""
    with write_transaction(engine) as connection:
        row = connection.execute(select(Team).where(Team.name == name)).first()
        if row is None:
            raise no_team(connection, name)
        team = Team(**{column: getattr(row, column) for column in _COLUMNS})
        before = _rules(team)
        _apply(team, settings)
        team.updated_at = datetime.now(UTC)
        connection.execute(update(Team).where(Team.id == row.id).values(**_columns(team)))
        record_event(connection, actor=actor, action="team.update", target=name, before=before, after=_rules(team))
        users = [(user_windows(row), row.period, user_windows(team), team.period)]
        if team.period != row.period:
            users += _move_user_budgets(connection, row.id, row.period, team.period)
    # Windows counted or budgeted only from now on start from the ledger's records.
    for period in to_recount(team_windows(row), row.period, team_windows(team), team.period):
        recount(engine, team_counter(team.id, team.name, period, None, team.updated_at), {"team": team.name})
    for period in sorted({period for change in users for period in to_recount(*change)}):
        recount_users(engine, team.id, team.name, period, team.updated_at)
    return get_team(engine, name)


def _move_user_budgets(
    connection: Connection, team_id: int, before: Period, after: Period
) -> list[tuple[Windows, Period, Windows, Period]]:
    """Move the shorthand budget of every end user with budgets of their own to the team's new period (it is in
    the team's period); returns each one's windows before and after."""
    columns = budget_columns(UserBudget)
    moved = []
    for user, *amounts in connection.execute(select(UserBudget.user, *columns).where(UserBudget.team_id == team_id)):
        old = windows_of(before, *amounts)
        try:
            new, _ = change_windows(old, before, WindowChange(period=after))
        except ValueError as clash:
            raise ValueError(f"end user {user!r}: {clash}") from None
        values = dict(zip(("budget_usd", *WINDOW_COLUMNS.values()), window_columns(new, after), strict=True))
        where = UserBudget.team_id == team_id, UserBudget.user == user
        connection.execute(update(UserBudget).where(*where).values(**values))
        moved.append((old, before, new, after))
    return moved


def get_team(engine: Engine, name: str, *, now: datetime | None = None) -> TeamView:
    """One team with its current-period spend."""
    views = list_teams(engine, name=name, now=now)
    if not views:
        with engine.connect() as connection:
            raise no_team(connection, name)
    return views[0]


def list_teams(engine: Engine, *, name: str | None = None, now: datetime | None = None) -> list[TeamView]:
    """All teams (or one), ordered by name, with spend and holds in each team's current period."""
    now = now or datetime.now(UTC)
    query = select(Team).order_by(Team.name)
    if name is not None:
        query = query.where(Team.name == name)
    with engine.connect() as connection:
        teams = connection.execute(query).all()
    counters = [team_counters(team.id, team.name, team.period, team_windows(team), now) for team in teams]
    spend = current_spend(engine, [counter for counted in counters for counter in counted])
    views = []
    for team, windows in zip(teams, counters, strict=True):
        (counter,) = (counter for counter in windows if counter.period == team.period)
        spent, reserved = spend[counter.scope]
        budget = team.budget_usd
        views.append(
            TeamView(
                name=team.name,
                budget_usd=budget,
                period=team.period,
                max_output_tokens=team.max_output_tokens,
                cap_policy=team.cap_policy,
                models=tuple(team.models.split(",")) if team.models is not None else None,
                retry_window_seconds=team.retry_window_seconds,
                user_budget_usd=team.user_budget_usd,
                rates=RateLimits(rpm=team.rpm, itpm=team.itpm, otpm=team.otpm),
                spent_usd=spent,
                reserved_usd=reserved,
                remaining_usd=None if budget is None else budget - spent - reserved,
                period_start=counter.period_start if team.period != "total" else None,
                windows=window_views(windows, spend),
                user_windows=user_windows(team),
                budget_edge=team.budget_edge,
            )
        )
    return views


def team_windows(team: Team | Row[Any]) -> Windows:
    """A team's own budget windows."""
    return windows_of(
        team.period, team.budget_usd, team.daily_budget_usd, team.weekly_budget_usd, team.monthly_budget_usd
    )


def user_windows(team: Team | Row[Any]) -> Windows:
    """Each end user's budget windows in a team (for users without their own)."""
    return windows_of(
        team.period,
        team.user_budget_usd,
        team.user_daily_budget_usd,
        team.user_weekly_budget_usd,
        team.user_monthly_budget_usd,
    )


_COLUMNS = (
    "id",
    "name",
    "budget_usd",
    "period",
    "max_output_tokens",
    "cap_policy",
    "models",
    "retry_window_seconds",
    "user_budget_usd",
    "rpm",
    "itpm",
    "otpm",
    *WINDOW_COLUMNS.values(),
    *(f"user_{column}" for column in WINDOW_COLUMNS.values()),
    "budget_edge",
    "created_at",
    "updated_at",
)


def _rules(team: Team) -> dict[str, Any]:
    """A team's settings as the audit trail shows them before and after a change."""
    return {
        "budget_usd": usd(team.budget_usd),
        "period": team.period,
        "max_output_tokens": team.max_output_tokens,
        "cap_policy": team.cap_policy,
        "models": team.models.split(",") if team.models is not None else None,
        "retry_window_seconds": team.retry_window_seconds,
        "user_budget_usd": usd(team.user_budget_usd),
        "rpm": team.rpm,
        "itpm": team.itpm,
        "otpm": team.otpm,
        "windows": named(team_windows(team)),
        "user_windows": named(user_windows(team)),
        "budget_edge": team.budget_edge,
    }


_SETTINGS = ("max_output_tokens", "cap_policy", "retry_window_seconds", "rpm", "itpm", "otpm", "budget_edge")


def _apply(team: Team, settings: TeamSettings) -> None:
    windows, period = change_windows(team_windows(team), team.period, settings.team_change())
    users, _ = change_windows(user_windows(team), team.period, settings.user_change())
    team.period = period
    team.budget_usd, team.daily_budget_usd, team.weekly_budget_usd, team.monthly_budget_usd = window_columns(
        windows, period
    )
    (
        team.user_budget_usd,
        team.user_daily_budget_usd,
        team.user_weekly_budget_usd,
        team.user_monthly_budget_usd,
    ) = window_columns(users, period)
    for field in _SETTINGS:
        value = getattr(settings, field)
        if not isinstance(value, Unset):
            setattr(team, field, value)
    if not isinstance(settings.models, Unset):
        team.models = ",".join(settings.models) if settings.models is not None else None


def _columns(team: Team) -> dict[str, Any]:
    return {column: getattr(team, column) for column in _COLUMNS if getattr(team, column) is not None or column != "id"}
