"""A team's end users (the user a call names): their spend this period against their allowance, and budgets of
their own that override the team's per-user budget."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from proxy.ledger.audit import record_event
from proxy.ledger.budgets import recount_users
from proxy.ledger.counters import NO_USER, TOTAL_PERIOD_START, ZERO, current_spend, user_counters
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import budget_columns
from proxy.ledger.rollup_reads import read
from proxy.ledger.schema import Team, UserBudget
from proxy.ledger.teams import no_team, user_windows
from proxy.ledger.windows import (
    WINDOW_COLUMNS,
    WindowChange,
    WindowView,
    change_windows,
    named,
    period_start,
    to_recount,
    window_columns,
    window_views,
    windows_of,
)
from proxy.types import Unset, Windows, usd

# End-user ids as the ledger stores them.
MAX_USER = 256
# The budget-window columns of `user_budgets`, and their names on `teams` after `user_` (the team's per-user ones).
_COLUMNS = ("budget_usd", *WINDOW_COLUMNS.values())
_WINDOWS = budget_columns(UserBudget)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserView:
    """One end user of a team: their allowance (the team's, or their own) and their spend this period."""

    user: str
    budget_usd: Decimal | None
    own_budget: bool  # set for this user (an override), rather than the team's per-user budget
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal | None
    windows: tuple[WindowView, ...] = ()  # every budgeted window of theirs, the shorthand's among them

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; money as exact decimal strings."""
        return {
            "user": self.user,
            "budget_usd": usd(self.budget_usd),
            "own_budget": self.own_budget,
            "spent_usd": usd(self.spent_usd),
            "reserved_usd": usd(self.reserved_usd),
            "remaining_usd": usd(self.remaining_usd),
            "windows": [window.to_json() for window in self.windows],
        }


def set_user_budget(engine: Engine, team: str, user: str, change: WindowChange | None, *, actor: str) -> UserView:
    """Give one end user of a team budget windows of their own (starting from the team's per-user ones, then
    `change`: its shorthand is in the team's period, None in a window means no limit there), or with None take them
    away (they get the team's per-user windows again). `""` names the calls that carry no user."""
    if len(user) > MAX_USER or "\x00" in user or not _encodable(user):
        # What a call's user can be (`label` makes header and metadata values so); another could never match.
        raise ValueError(f"an end user id is at most {MAX_USER} characters of valid Unicode, without NUL")
    if change is not None and not isinstance(change.period, Unset):
        raise ValueError("an end user's shorthand budget is in their team's period: change the team's --period")
    with write_transaction(engine) as connection:
        row = connection.execute(select(Team).where(Team.name == team)).first()
        if row is None:
            raise no_team(connection, team)
        where = UserBudget.team_id == row.id, UserBudget.user == user
        stored = connection.execute(select(*_WINDOWS).where(*where)).first()
        own = None if stored is None else windows_of(row.period, stored[0], stored[1], stored[2], stored[3])
        defaults = user_windows(row)
        before_windows = defaults if own is None else own
        windows = defaults if change is None else change_windows(before_windows, row.period, change)[0]
        before = {"user": user, "windows": "team default" if own is None else named(own)}
        after = {"user": user, "windows": "team default" if change is None else named(windows)}
        if after != before:
            connection.execute(delete(UserBudget).where(*where))
            if change is not None:
                columns = dict(zip(_COLUMNS, window_columns(windows, row.period), strict=True))
                connection.execute(insert(UserBudget).values(team_id=row.id, user=user, **columns))
            record_event(connection, actor=actor, action="team.user_budget", target=team, before=before, after=after)
    for period in to_recount(before_windows, row.period, windows, row.period):
        recount_users(engine, row.id, team, period, datetime.now(UTC))
    found = [view for view in list_users(engine, team) if view.user == user]
    if found:
        return found[0]
    default = row.user_budget_usd
    return UserView(
        user=user, budget_usd=default, own_budget=False, spent_usd=ZERO, reserved_usd=ZERO, remaining_usd=default
    )


def list_users(
    engine: Engine, team: str, *, now: datetime | None = None, only: Collection[str] | None = None
) -> list[UserView]:
    """A team's end users with calls this period or a budget of their own, by spend (largest first). Spend is the
    ledger's (so it shows with or without end-user budgets); holds are their counters'."""
    now = now or datetime.now(UTC)
    with engine.connect() as connection:
        row = connection.execute(select(Team).where(Team.name == team)).first()
        if row is None:
            raise no_team(connection, team)
        stored = select(UserBudget.user, *_WINDOWS).where(UserBudget.team_id == row.id)
        own: dict[str, Windows] = {
            found[0]: windows_of(row.period, found[1], found[2], found[3], found[4])
            for found in connection.execute(stored)
        }
        start = period_start(row.period, now) or TOTAL_PERIOD_START
        found = read(connection, groups=["user"], measures=["cost_usd"], since=start, until=None, where={"team": team})
        spent = {NO_USER if name is None else name: totals["cost_usd"] or ZERO for (name,), totals in found.items()}
    defaults = user_windows(row)
    users = sorted(name for name in {*spent, *own} if only is None or name in only)
    counters = {name: user_counters(row.id, team, name, row.period, own.get(name, defaults), now) for name in users}
    held = current_spend(engine, [counter for windows in counters.values() for counter in windows])
    views = []
    for name in users:
        windows = own.get(name, defaults)
        budget = windows.get(row.period)
        (shorthand,) = (counter for counter in counters[name] if counter.period == row.period)
        reserved = held[shorthand.scope][1]
        spend = spent.get(name, ZERO)
        views.append(
            UserView(
                user=name,
                budget_usd=budget,
                own_budget=name in own,
                spent_usd=spend,
                reserved_usd=reserved,
                remaining_usd=None if budget is None else budget - spend - reserved,
                windows=window_views(counters[name], held),
            )
        )
    return sorted(views, key=lambda view: (-view.spent_usd, view.user))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
