"""Team and key management: the one implementation behind the CLI and the admin API."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from proxy.ledger.audit import record_event
from proxy.ledger.budgets import (
    NO_USER,
    TOTAL_PERIOD_START,
    ZERO,
    current_spend,
    period_start,
    recount,
    recount_users,
    team_counter,
    user_counter,
)
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import hash_key, new_key, new_key_id
from proxy.ledger.schema import APIKey, Team, UsageRow, UserBudget, effective_cost
from proxy.types import CAP_POLICIES, NO_RATE_LIMITS, PERIODS, CapPolicy, Period, RateLimits, usd

# Rate limits are INTEGER columns.
MAX_RATE = 2**31 - 1
# End-user ids as the ledger stores them.
MAX_USER = 256
# Team names travel in admin API paths and in every record: no spaces, slashes or look-alikes.
TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class Unset:
    """The type of `UNSET`: an option that was not given, as opposed to one given as None ("no limit")."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


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

    def __post_init__(self) -> None:
        for amount in (self.budget_usd, self.user_budget_usd):
            if isinstance(amount, Decimal) and amount < 0:
                raise ValueError(f"budget must not be negative, got {amount}")
        check_rates(self.rpm, self.itpm, self.otpm)
        if not isinstance(self.period, Unset) and self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {self.period!r}")
        if not isinstance(self.cap_policy, Unset) and self.cap_policy not in CAP_POLICIES:
            raise ValueError(f"cap policy must be one of {', '.join(CAP_POLICIES)}, got {self.cap_policy!r}")
        window = self.retry_window_seconds
        if not isinstance(window, Unset) and window < 0:
            raise ValueError(f"retry window must be 0 (off) or a number of seconds, got {window}")
        tokens = self.max_output_tokens
        if not isinstance(tokens, Unset) and tokens is not None and tokens < 1:
            raise ValueError(f"max output tokens must be at least 1, got {tokens}")


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
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyView:
    """A key as `keys list` shows it; never the key itself."""

    id: str
    team: str
    name: str | None
    prefix: str
    budget_usd: Decimal | None
    period: str
    rates: RateLimits
    created_at: datetime
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "team": self.team,
            "name": self.name,
            "prefix": self.prefix,
            "budget_usd": usd(self.budget_usd),
            "period": self.period,
            "rpm": self.rates.rpm,
            "itpm": self.rates.itpm,
            "otpm": self.rates.otpm,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
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
    team = Team(name=name, period="month", cap_policy="clamp", retry_window_seconds=600, created_at=now, updated_at=now)
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
    if team.period != row.period:
        # A new period kind starts a counter that has never been settled into: count it from the ledger.
        counter = team_counter(team.id, team.name, team.period, team.budget_usd, team.updated_at)
        recount(engine, counter, UsageRow.team == team.name)
    if team.period != row.period or (row.user_budget_usd is None and team.user_budget_usd is not None):
        # A new period kind starts counters never settled into; and spend from before end users had counters
        # (an older spendgate) is only in the records: count them from the ledger.
        recount_users(engine, team.id, team.name, team.period, team.updated_at)
    return get_team(engine, name)


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
    counters = [team_counter(team.id, team.name, team.period, team.budget_usd, now) for team in teams]
    spend = current_spend(engine, counters)
    views = []
    for team, counter in zip(teams, counters, strict=True):
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
            )
        )
    return views


def create_key(
    engine: Engine,
    team: str,
    *,
    actor: str,
    name: str | None = None,
    budget_usd: Decimal | None = None,
    period: Period = "month",
    rates: RateLimits = NO_RATE_LIMITS,
) -> tuple[KeyView, str]:
    """Create a client key for a team; returns its view and the key, which is never shown again."""
    if budget_usd is not None and budget_usd < 0:
        raise ValueError(f"budget must not be negative, got {budget_usd}")
    check_rates(rates.rpm, rates.itpm, rates.otpm)
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    key = new_key()
    key_id = new_key_id()
    with write_transaction(engine) as connection:
        team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
        if team_id is None:
            raise no_team(connection, team, create=True)
        connection.execute(
            insert(APIKey).values(
                id=key_id,
                team_id=team_id,
                name=name,
                key_hash=hash_key(key),
                prefix=key[:10],
                budget_usd=budget_usd,
                period=period,
                created_at=datetime.now(UTC),
                **asdict(rates),
            )
        )
        after = {
            "team": team,
            "name": name,
            "prefix": key[:10],
            "budget_usd": usd(budget_usd),
            "period": period,
            **asdict(rates),
        }
        record_event(connection, actor=actor, action="key.create", target=key_id, after=after)
    return get_key(engine, key_id), key


def update_key(
    engine: Engine,
    key_id: str,
    *,
    actor: str,
    rpm: int | None | Unset = UNSET,
    itpm: int | None | Unset = UNSET,
    otpm: int | None | Unset = UNSET,
) -> KeyView:
    """Change a key's rate limits (None: no limit; `UNSET`: as it is). Every replica applies them within its
    key-cache lifetime."""
    check_rates(rpm, itpm, otpm)
    changes = {
        name: value for name, value in (("rpm", rpm), ("itpm", itpm), ("otpm", otpm)) if not isinstance(value, Unset)
    }
    with write_transaction(engine) as connection:
        row = connection.execute(select(APIKey.rpm, APIKey.itpm, APIKey.otpm).where(APIKey.id == key_id)).first()
        if row is None:
            raise NotFound(f"no key with id {key_id!r}")
        before = dict(row._mapping)
        after = {**before, **changes}
        if after != before:
            connection.execute(update(APIKey).where(APIKey.id == key_id).values(**changes))
            record_event(connection, actor=actor, action="key.update", target=key_id, before=before, after=after)
    return get_key(engine, key_id)


def revoke_key(engine: Engine, key_id: str, *, actor: str) -> KeyView:
    """Revoke a key; every replica refuses it within its key-cache lifetime (5 s by default)."""
    now = datetime.now(UTC)
    with write_transaction(engine) as connection:
        result = connection.execute(
            update(APIKey).where(APIKey.id == key_id, APIKey.revoked_at.is_(None)).values(revoked_at=now)
        )
        if result.rowcount == 1:
            after = {"revoked_at": now.isoformat()}
            record_event(connection, actor=actor, action="key.revoke", target=key_id, after=after)
    view = get_key(engine, key_id)
    if result.rowcount == 0 and view.revoked_at is None:
        raise NotFound(f"no key with id {key_id!r}")
    return view


def get_key(engine: Engine, key_id: str) -> KeyView:
    """One key by id."""
    keys = list_keys(engine, key_id=key_id)
    if not keys:
        raise NotFound(f"no key with id {key_id!r}")
    return keys[0]


def list_keys(engine: Engine, *, team: str | None = None, key_id: str | None = None) -> list[KeyView]:
    """Keys, oldest first, optionally of one team (`NotFound` if there is no such team)."""
    if team is not None:
        get_team(engine, team)
    query = select(APIKey, Team.name).join(Team, Team.id == APIKey.team_id).order_by(APIKey.created_at, APIKey.id)
    if team is not None:
        query = query.where(Team.name == team)
    if key_id is not None:
        query = query.where(APIKey.id == key_id)
    with Session(engine) as session:
        rows = session.execute(query).all()
    return [
        KeyView(
            id=key.id,
            team=team_name,
            name=key.name,
            prefix=key.prefix,
            budget_usd=key.budget_usd,
            period=key.period,
            rates=RateLimits(rpm=key.rpm, itpm=key.itpm, otpm=key.otpm),
            created_at=key.created_at,
            revoked_at=key.revoked_at,
        )
        for key, team_name in rows
    ]


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
    }


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SETTINGS = (
    "budget_usd",
    "period",
    "max_output_tokens",
    "cap_policy",
    "retry_window_seconds",
    "user_budget_usd",
    "rpm",
    "itpm",
    "otpm",
)


def _apply(team: Team, settings: TeamSettings) -> None:
    for field in _SETTINGS:
        value = getattr(settings, field)
        if not isinstance(value, Unset):
            setattr(team, field, value)
    if not isinstance(settings.models, Unset):
        team.models = ",".join(settings.models) if settings.models is not None else None


def _columns(team: Team) -> dict[str, Any]:
    return {column: getattr(team, column) for column in _COLUMNS if getattr(team, column) is not None or column != "id"}
