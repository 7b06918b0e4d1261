"""Client keys as teams' administrators manage them: created (the key shown once), rate limits changed, revoked,
listed; every change with an audit entry. Key material and the auth cache are proxy/ledger/keys.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from proxy.ledger.audit import record_event
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import hash_key, new_key, new_key_id
from proxy.ledger.schema import APIKey, Team
from proxy.ledger.teams import UNSET, NotFound, Unset, check_rates, get_team, no_team
from proxy.types import NO_RATE_LIMITS, PERIODS, Period, RateLimits, usd


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
