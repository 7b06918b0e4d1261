"""Client keys as teams' administrators and people manage them: created (the key shown once), rotated, rate limits
changed, revoked, listed; every change with an audit entry. Key material and the auth cache are
proxy/ledger/keys.py.

A personal key has an owner (`oidc:<sub>`), the person every call made with it is attributed to, and usually an
expiry. One made by `spendgate login` also has a refresh token, which `renew_key` trades for a fresh key (and a
fresh refresh token), revoking the old key: what `spendgate key-helper` does before a key runs out.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Row, insert, select, update
from sqlalchemy.orm import Session

from proxy.ledger.audit import record_event
from proxy.ledger.budgets import recount
from proxy.ledger.counters import key_counter
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import budget_columns, hash_key, new_key, new_key_id
from proxy.ledger.people import is_member, signed_in_since
from proxy.ledger.schema import APIKey, Team
from proxy.ledger.teams import NotFound, check_rates, get_team, no_team
from proxy.ledger.windows import (
    WINDOW_COLUMNS,
    WindowChange,
    change_windows,
    named,
    to_recount,
    window_columns,
    windows_of,
)
from proxy.types import NO_RATE_LIMITS, UNSET, Period, RateLimits, Unset, Windows, usd


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
    key_owner: str | None = None
    expires_at: datetime | None = None
    windows: Windows = field(default_factory=dict)  # every budgeted window, the shorthand's among them

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
            "key_owner": self.key_owner,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "windows": named(self.windows),
        }


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: its view, the key itself (shown once), and its refresh token when it has one."""

    view: KeyView
    key: str
    refresh_token: str | None = None
    # The key this one replaced (revoked in the same transaction), for rotations and renewals.
    replaces: str | None = None


# A key's budget-window columns: the shorthand `budget_usd` in `period`, then the daily, weekly and monthly ones.
_WINDOW_COLUMNS = ("budget_usd", *WINDOW_COLUMNS.values())


def _window_columns(windows: Windows, period: Period) -> dict[str, Decimal | None]:
    return dict(zip(_WINDOW_COLUMNS, window_columns(windows, period), strict=True))


# A personal key lives this long unless its maker says otherwise.
PERSONAL_KEY_DAYS = 90
# A key is renewed only for a person who signed in this recently: someone the provider no longer lets in stops
# getting new keys this long after their last sign-in at the latest.
RENEW_WITHIN_DAYS = 30
MAX_KEY_DAYS = 3650


def create_key(
    engine: Engine,
    team: str,
    *,
    actor: str,
    name: str | None = None,
    budget_usd: Decimal | None = None,
    period: Period = "month",
    windows: Mapping[Period, Decimal | None] | None = None,
    rates: RateLimits = NO_RATE_LIMITS,
    owner: str | None = None,
    expires_days: int | None = None,
) -> tuple[KeyView, str]:
    """Create a client key for a team; returns its view and the key, which is never shown again. Its own budget is
    `budget_usd` per `period` and `windows` (daily, weekly, monthly); `owner` makes it a person's key;
    `expires_days` (None: never) when it stops working."""
    budgets, _ = change_windows({}, period, WindowChange(budget=budget_usd, period=period, windows=windows))
    check_rates(rates.rpm, rates.itpm, rates.otpm)
    check_days(expires_days)
    with write_transaction(engine) as connection:
        team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
        if team_id is None:
            raise no_team(connection, team, create=True)
        made = _insert_key(
            connection,
            team,
            team_id,
            actor=actor,
            name=name,
            owner=owner,
            expires_days=expires_days,
            refreshable=False,
            extra={"period": period, **_window_columns(budgets, period), **asdict(rates)},
        )
    return get_key(engine, made.view.id), made.key


def issue_personal_key(
    connection: Connection, team: str, team_id: int, *, owner: str, name: str | None, expires_days: int | None
) -> NewKey:
    """A person's key with a refresh token, in the caller's transaction (the device grant's last step)."""
    check_days(expires_days)
    return _insert_key(
        connection,
        team,
        team_id,
        actor=owner,
        name=name,
        owner=owner,
        expires_days=expires_days,
        refreshable=True,
        extra={},
    )


def rotate_key(engine: Engine, key_id: str, *, actor: str, owner: str | None = None) -> tuple[KeyView, str]:
    """A new key in place of `key_id` (same team, name, owner, limits and lifetime), which is revoked in the same
    transaction. With `owner`, only that person's key may be rotated, while they still belong to its team
    (`NotFound` otherwise)."""
    with write_transaction(engine) as connection:
        old = _live_key(connection, APIKey.id == key_id, owner=owner)
        if old is not None and owner is not None and not is_member(connection, owner, old.team_id):
            old = None
        # No refresh token: it would be shown to nobody (the tool that holds the old one signs in again).
        made = _replace_key(connection, old, actor=actor, refreshable=False)
    if made is None:
        raise NotFound(f"no live key with id {key_id!r}")
    return get_key(engine, made.view.id), made.key


def renew_key(engine: Engine, refresh_token: str) -> NewKey | None:
    """Trade a refresh token for a new key and refresh token, revoking the key it belonged to; None when the token
    is unknown or used, its key revoked or expired, or its person no longer in the key's team (as of their last
    sign-in and today's group mappings) or not signed in for `RENEW_WITHIN_DAYS`: sign in again, `spendgate
    login`."""
    with write_transaction(engine) as connection:
        old = _live_key(connection, APIKey.refresh_hash == hash_key(refresh_token), owner=None)
        if old is None or old.owner is None or not is_member(connection, old.owner, old.team_id):
            return None
        if not signed_in_since(connection, old.owner, datetime.now(UTC) - timedelta(days=RENEW_WITHIN_DAYS)):
            return None
        return _replace_key(connection, old, actor=old.owner, refreshable=True)


def _live_key(connection: Connection, condition: ColumnElement[bool], *, owner: str | None) -> Row[Any] | None:
    query = select(APIKey.__table__).where(condition, APIKey.revoked_at.is_(None))
    if owner is not None:
        query = query.where(APIKey.owner == owner)
    key = connection.execute(query.with_for_update()).first()
    if key is None or (key.expires_at is not None and key.expires_at <= datetime.now(UTC)):
        return None
    return key


def _replace_key(connection: Connection, old: Row[Any] | None, *, actor: str, refreshable: bool) -> NewKey | None:
    if old is None:
        return None
    now = datetime.now(UTC)
    connection.execute(update(APIKey).where(APIKey.id == old.id).values(revoked_at=now, refresh_hash=None))
    record_event(connection, actor=actor, action="key.revoke", target=old.id, after={"revoked_at": now.isoformat()})
    team = connection.execute(select(Team.name).where(Team.id == old.team_id)).scalar_one()
    lifetime = (old.expires_at - old.created_at).days if old.expires_at is not None else None
    return _insert_key(
        connection,
        team,
        old.team_id,
        actor=actor,
        name=old.name,
        owner=old.owner,
        expires_days=max(1, lifetime) if lifetime is not None else None,
        refreshable=refreshable,
        extra={
            "period": old.period,
            **{column: getattr(old, column) for column in _WINDOW_COLUMNS},
            "rpm": old.rpm,
            "itpm": old.itpm,
            "otpm": old.otpm,
        },
        replaces=old.id,
    )


def _insert_key(
    connection: Connection,
    team: str,
    team_id: int,
    *,
    actor: str,
    name: str | None,
    owner: str | None,
    expires_days: int | None,
    refreshable: bool,
    extra: dict[str, Any],
    replaces: str | None = None,
) -> NewKey:
    key, key_id = new_key(), new_key_id()
    now = datetime.now(UTC)
    expires_at = now + timedelta(days=expires_days) if expires_days is not None else None
    refresh_token = "sg-refresh-" + secrets.token_urlsafe(32) if refreshable else None
    connection.execute(
        insert(APIKey).values(
            id=key_id,
            team_id=team_id,
            name=name,
            key_hash=hash_key(key),
            prefix=key[:10],
            created_at=now,
            owner=owner,
            expires_at=expires_at,
            refresh_hash=hash_key(refresh_token) if refresh_token else None,
            **extra,
        )
    )
    after = {
        "team": team,
        "name": name,
        "prefix": key[:10],
        **{column: usd(value) if column in _WINDOW_COLUMNS else value for column, value in extra.items()},
    }
    for field_name, value in (("key_owner", owner), ("expires_at", expires_at), ("replaces", replaces)):
        if value is not None:
            after[field_name] = value.isoformat() if isinstance(value, datetime) else value
    record_event(connection, actor=actor, action="key.create", target=key_id, after=after)
    view = KeyView(
        id=key_id,
        team=team,
        name=name,
        prefix=key[:10],
        budget_usd=extra.get("budget_usd"),
        period=extra.get("period", "month"),
        windows=windows_of(extra.get("period", "month"), *(extra.get(column) for column in _WINDOW_COLUMNS)),
        rates=RateLimits(rpm=extra.get("rpm"), itpm=extra.get("itpm"), otpm=extra.get("otpm")),
        created_at=now,
        revoked_at=None,
        key_owner=owner,
        expires_at=expires_at,
    )
    return NewKey(view=view, key=key, refresh_token=refresh_token, replaces=replaces)


def check_days(days: int | None) -> None:
    """A key's lifetime is 1 to `MAX_KEY_DAYS` days (None: no expiry)."""
    if days is not None and not 1 <= days <= MAX_KEY_DAYS:
        raise ValueError(f"a key expires after 1 to {MAX_KEY_DAYS} days (or never), got {days}")


def update_key(
    engine: Engine,
    key_id: str,
    *,
    actor: str,
    rpm: int | None | Unset = UNSET,
    itpm: int | None | Unset = UNSET,
    otpm: int | None | Unset = UNSET,
    budget: WindowChange | None = None,
) -> KeyView:
    """Change a key's rate limits (None: no limit; `UNSET`: as it is) and its own budget windows (`budget`). Every
    replica applies them within its key-cache lifetime."""
    check_rates(rpm, itpm, otpm)
    changes: dict[str, Any] = {
        name: value for name, value in (("rpm", rpm), ("itpm", itpm), ("otpm", otpm)) if not isinstance(value, Unset)
    }
    columns = (APIKey.rpm, APIKey.itpm, APIKey.otpm, APIKey.period, *budget_columns(APIKey))
    with write_transaction(engine) as connection:
        row = connection.execute(select(*columns).where(APIKey.id == key_id)).first()
        if row is None:
            raise NotFound(f"no key with id {key_id!r}")
        before = {**dict(row._mapping), **{column: usd(row._mapping[column]) for column in _WINDOW_COLUMNS}}
        old = windows_of(
            row.period, row.budget_usd, row.daily_budget_usd, row.weekly_budget_usd, row.monthly_budget_usd
        )
        windows, period = old, row.period
        if budget is not None:
            windows, period = change_windows(old, row.period, budget)
            changes |= {"period": period, **_window_columns(windows, period)}
        after = {
            **before,
            **{column: usd(value) if column in _WINDOW_COLUMNS else value for column, value in changes.items()},
        }
        if after != before:
            connection.execute(update(APIKey).where(APIKey.id == key_id).values(**changes))
            record_event(connection, actor=actor, action="key.update", target=key_id, before=before, after=after)
    now = datetime.now(UTC)
    for window in to_recount(old, row.period, windows, period):
        recount(engine, key_counter(key_id, window, None, now), {"key": key_id})
    return get_key(engine, key_id)


def revoke_key(engine: Engine, key_id: str, *, actor: str, owner: str | None = None) -> KeyView:
    """Revoke a key; every replica refuses it within its key-cache lifetime (5 s by default). With `owner`, only
    that person's key may be revoked (`NotFound` otherwise)."""
    now = datetime.now(UTC)
    mine = (APIKey.owner == owner,) if owner is not None else ()
    with write_transaction(engine) as connection:
        result = connection.execute(
            update(APIKey)
            .where(APIKey.id == key_id, APIKey.revoked_at.is_(None), *mine)
            .values(revoked_at=now, refresh_hash=None)
        )
        if result.rowcount == 1:
            after = {"revoked_at": now.isoformat()}
            record_event(connection, actor=actor, action="key.revoke", target=key_id, after=after)
    view = get_key(engine, key_id)
    if (result.rowcount == 0 and view.revoked_at is None) or (owner is not None and view.key_owner != owner):
        raise NotFound(f"no key with id {key_id!r}")
    return view


def get_key(engine: Engine, key_id: str) -> KeyView:
    """One key by id."""
    keys = list_keys(engine, key_id=key_id)
    if not keys:
        raise NotFound(f"no key with id {key_id!r}")
    return keys[0]


def list_keys(
    engine: Engine, *, team: str | None = None, key_id: str | None = None, owner: str | None = None
) -> list[KeyView]:
    """Keys, oldest first, optionally of one team (`NotFound` if there is no such team) or one person."""
    if team is not None:
        get_team(engine, team)
    query = select(APIKey, Team.name).join(Team, Team.id == APIKey.team_id).order_by(APIKey.created_at, APIKey.id)
    if team is not None:
        query = query.where(Team.name == team)
    if key_id is not None:
        query = query.where(APIKey.id == key_id)
    if owner is not None:
        query = query.where(APIKey.owner == owner)
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
            windows=windows_of(key.period, *(getattr(key, column) for column in _WINDOW_COLUMNS)),
            rates=RateLimits(rpm=key.rpm, itpm=key.itpm, otpm=key.otpm),
            created_at=key.created_at,
            revoked_at=key.revoked_at,
            key_owner=key.owner,
            expires_at=key.expires_at,
        )
        for key, team_name in rows
    ]
