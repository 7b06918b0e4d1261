"""Team and key management: the one implementation behind the CLI and the admin API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from proxy.audit import record_event
from proxy.budgets import current_spend, recount, team_counter
from proxy.db import write_transaction
from proxy.keys import hash_key, new_key, new_key_id
from proxy.models import APIKey, Team, UsageRow
from proxy.types import CAP_POLICIES, PERIODS, CapPolicy, Period, usd

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

    def __post_init__(self) -> None:
        if not isinstance(self.budget_usd, Unset) and self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget must not be negative, got {self.budget_usd}")
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
            raise NotFound(f"no team named {name!r}")
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
    return get_team(engine, name)


def get_team(engine: Engine, name: str, *, now: datetime | None = None) -> TeamView:
    """One team with its current-period spend."""
    views = list_teams(engine, name=name, now=now)
    if not views:
        raise NotFound(f"no team named {name!r}")
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
) -> tuple[KeyView, str]:
    """Create a client key for a team; returns its view and the key, which is never shown again."""
    if budget_usd is not None and budget_usd < 0:
        raise ValueError(f"budget must not be negative, got {budget_usd}")
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    key = new_key()
    key_id = new_key_id()
    with write_transaction(engine) as connection:
        team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
        if team_id is None:
            raise NotFound(f"no team named {team!r}; create it with `spendgate teams create {team}`")
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
            )
        )
        after = {"team": team, "name": name, "prefix": key[:10], "budget_usd": usd(budget_usd), "period": period}
        record_event(connection, actor=actor, action="key.create", target=key_id, after=after)
    return get_key(engine, key_id), key


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
    }


def _apply(team: Team, settings: TeamSettings) -> None:
    for field in ("budget_usd", "period", "max_output_tokens", "cap_policy", "retry_window_seconds"):
        value = getattr(settings, field)
        if not isinstance(value, Unset):
            setattr(team, field, value)
    if not isinstance(settings.models, Unset):
        team.models = ",".join(settings.models) if settings.models is not None else None


def _columns(team: Team) -> dict[str, Any]:
    return {column: getattr(team, column) for column in _COLUMNS if getattr(team, column) is not None or column != "id"}
