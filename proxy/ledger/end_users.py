"""A team's end users (the user a call names): their spend this period against their allowance, and budgets of
their own that override the team's per-user budget."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select

from proxy.ledger.audit import record_event
from proxy.ledger.counters import NO_USER, TOTAL_PERIOD_START, ZERO, current_spend, period_start, user_counter
from proxy.ledger.db import write_transaction
from proxy.ledger.schema import Team, UsageRow, UserBudget, effective_cost
from proxy.ledger.teams import Unset, no_team
from proxy.types import usd

# End-user ids as the ledger stores them.
MAX_USER = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class UserView:
    """One end user of a team: their allowance (the team's, or their own) and their spend this period."""

    user: str
    budget_usd: Decimal | None
    own_budget: bool  # set for this user (an override), rather than the team's per-user budget
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; money as exact decimal strings."""
        return {
            "user": self.user,
            "budget_usd": usd(self.budget_usd),
            "own_budget": self.own_budget,
            "spent_usd": usd(self.spent_usd),
            "reserved_usd": usd(self.reserved_usd),
            "remaining_usd": usd(self.remaining_usd),
        }


def set_user_budget(
    engine: Engine, team: str, user: str, budget_usd: Decimal | None | Unset, *, actor: str
) -> UserView:
    """Give one end user of a team their own budget per period (None: no limit for them), or with `UNSET` take it
    away (they get the team's per-user budget again). `""` names the calls that carry no user."""
    if len(user) > MAX_USER or "\x00" in user or not _encodable(user):
        # What a call's user can be (`label` makes header and metadata values so); another could never match.
        raise ValueError(f"an end user id is at most {MAX_USER} characters of valid Unicode, without NUL")
    if isinstance(budget_usd, Decimal) and budget_usd < 0:
        raise ValueError(f"budget must not be negative, got {budget_usd}")
    with write_transaction(engine) as connection:
        row = connection.execute(select(Team).where(Team.name == team)).first()
        if row is None:
            raise no_team(connection, team)
        where = UserBudget.team_id == row.id, UserBudget.user == user
        own = connection.execute(select(UserBudget.budget_usd).where(*where)).first()
        before = {"user": user, "budget_usd": usd(own[0]) if own else "team default"}
        after = {"user": user, "budget_usd": "team default" if isinstance(budget_usd, Unset) else usd(budget_usd)}
        if after != before:
            connection.execute(delete(UserBudget).where(*where))
            if not isinstance(budget_usd, Unset):
                connection.execute(insert(UserBudget).values(team_id=row.id, user=user, budget_usd=budget_usd))
            record_event(connection, actor=actor, action="team.user_budget", target=team, before=before, after=after)
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
    user = func.coalesce(UsageRow.user, NO_USER)
    money = func.decimal_sum if engine.dialect.name == "sqlite" else func.sum
    with engine.connect() as connection:
        row = connection.execute(select(Team).where(Team.name == team)).first()
        if row is None:
            raise no_team(connection, team)
        query = select(UserBudget.user, UserBudget.budget_usd).where(UserBudget.team_id == row.id)
        own: dict[str, Decimal | None] = {name: budget for name, budget in connection.execute(query)}
        start = period_start(row.period, now) or TOTAL_PERIOD_START
        query = (
            select(user, money(effective_cost()))
            .where(UsageRow.team == team, UsageRow.started_at >= start)
            .group_by(user)
        )
        spent = {name: Decimal(total or 0) for name, total in connection.execute(query)}
    users = sorted(name for name in {*spent, *own} if only is None or name in only)
    counters = {name: user_counter(row.id, team, name, row.period, None, now) for name in users}
    held = current_spend(engine, counters.values())
    views = []
    for name in users:
        budget = own[name] if name in own else row.user_budget_usd
        reserved = held[counters[name].scope][1]
        spend = spent.get(name, ZERO)
        views.append(
            UserView(
                user=name,
                budget_usd=budget,
                own_budget=name in own,
                spent_usd=spend,
                reserved_usd=reserved,
                remaining_usd=None if budget is None else budget - spend - reserved,
            )
        )
    return sorted(views, key=lambda view: (-view.spent_usd, view.user))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
