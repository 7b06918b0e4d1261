"""Device authorization (RFC 8628): a command-line tool gets a person's key without ever seeing their sign-in.

The tool asks for a grant and shows its person a short user code; the person signs in to the dashboard, enters the
code and picks a team; the tool, polling with the (secret) device code, then receives a fresh personal key and its
refresh token. The key is made at that moment and only its hash is kept: no key waits in the ledger to be
collected. A grant lives ten minutes and hands out one key, once.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Engine, delete, insert, select, update

from proxy.ledger.db import write_transaction
from proxy.ledger.key_admin import NewKey, check_days, issue_personal_key
from proxy.ledger.keys import hash_key
from proxy.ledger.people import is_member
from proxy.ledger.schema import DeviceGrant, Team
from proxy.ledger.web_sessions import evict_oldest

# RFC 8628 section 6.1: twenty consonants (no vowels, so no words), eight of them: 34 bits, typed with ease.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
GRANT_SECONDS = 600
# Grants kept at once, at most: each is a row anyone may ask for without signing in. Past it the oldest go, so a
# flood shortens how long a code lives rather than refusing new ones.
MAX_GRANTS = 10_000
Waiting = Literal["authorization_pending", "slow_down", "access_denied", "expired_token", "invalid_grant"]


@dataclass(frozen=True, slots=True)
class StartedGrant:
    """What the tool is told: its secret device code and the code its person types."""

    device_code: str
    user_code: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class PendingGrant:
    """What the person approving is shown: where and when the request came from."""

    user_code: str
    client_address: str
    created_at: datetime


def start_grant(engine: Engine, client_address: str) -> StartedGrant:
    """A new pending grant, asked for from `client_address` (blocking)."""
    device_code = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with write_transaction(engine) as connection:
        connection.execute(delete(DeviceGrant).where(DeviceGrant.expires_at < now))
        evict_oldest(connection, DeviceGrant.device_hash, DeviceGrant.created_at, keep=MAX_GRANTS - 1)
        user_code = _new_user_code()
        while connection.execute(select(DeviceGrant.user_code).where(DeviceGrant.user_code == user_code)).first():
            user_code = _new_user_code()
        connection.execute(
            insert(DeviceGrant).values(
                device_hash=hash_key(device_code),
                user_code=user_code,
                created_at=now,
                expires_at=now + timedelta(seconds=GRANT_SECONDS),
                status="pending",
                client_address=client_address[:64],
            )
        )
    return StartedGrant(device_code=device_code, user_code=user_code, expires_in=GRANT_SECONDS)


def normalize_user_code(raw: str) -> str | None:
    """The canonical `XXXX-XXXX` form of a typed code (case, spaces and dashes ignored), or None if it cannot be
    one."""
    letters = "".join(ch for ch in raw.upper() if ch not in " -\t")
    if len(letters) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in letters):
        return None
    return f"{letters[:4]}-{letters[4:]}"


def pending(engine: Engine, user_code: str) -> PendingGrant | None:
    """The grant with this code, if it waits for a decision."""
    with engine.connect() as connection:
        row = connection.execute(
            select(DeviceGrant.client_address, DeviceGrant.created_at).where(
                DeviceGrant.user_code == user_code,
                DeviceGrant.status == "pending",
                DeviceGrant.expires_at > datetime.now(UTC),
            )
        ).first()
    return None if row is None else PendingGrant(user_code, row.client_address or "unknown", row.created_at)


def decide(
    engine: Engine,
    user_code: str,
    *,
    subject: str,
    approve: bool,
    team: str | None = None,
    key_name: str | None = None,
    key_days: int | None = None,
) -> bool:
    """Approve (for `subject`'s key on `team`) or deny the pending grant with this code; False if there is none."""
    check_days(key_days)
    now = datetime.now(UTC)
    with write_transaction(engine) as connection:
        team_id = None
        if approve:
            team_id = connection.execute(select(Team.id).where(Team.name == team)).scalar()
            if team_id is None:
                return False
        decided = connection.execute(
            update(DeviceGrant)
            .where(DeviceGrant.user_code == user_code, DeviceGrant.status == "pending", DeviceGrant.expires_at > now)
            .values(
                status="approved" if approve else "denied",
                subject=subject,
                team_id=team_id,
                key_name=key_name,
                key_days=key_days,
            )
        )
    return decided.rowcount == 1


def poll(engine: Engine, device_code: str, *, interval: int) -> NewKey | Waiting:
    """What a polling tool gets: its key (once), or why not yet (RFC 8628 section 3.5)."""
    now = datetime.now(UTC)
    with write_transaction(engine) as connection:
        grant = connection.execute(
            select(DeviceGrant.__table__).where(DeviceGrant.device_hash == hash_key(device_code)).with_for_update()
        ).first()
        if grant is None:
            return "invalid_grant"
        if grant.expires_at <= now or grant.status == "issued":
            return "expired_token"
        if grant.status == "denied":
            return "access_denied"
        # A poll within the interval of the last one answered is told to slow down, and not counted: the interval
        # runs from the last poll that was answered.
        if grant.polled_at is not None and grant.polled_at > now - timedelta(seconds=interval * 0.9):
            return "slow_down"
        connection.execute(
            update(DeviceGrant).where(DeviceGrant.device_hash == grant.device_hash).values(polled_at=now)
        )
        if grant.status != "approved" or grant.subject is None or grant.team_id is None:
            return "authorization_pending"
        team = connection.execute(select(Team.name).where(Team.id == grant.team_id)).scalar_one()
        connection.execute(
            update(DeviceGrant).where(DeviceGrant.device_hash == grant.device_hash).values(status="issued")
        )
        if not is_member(connection, grant.subject, grant.team_id):
            return "access_denied"
        return issue_personal_key(
            connection,
            team,
            grant.team_id,
            owner=grant.subject,
            name=grant.key_name,
            expires_days=grant.key_days,
        )


def _new_user_code() -> str:
    letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return f"{letters[:4]}-{letters[4:]}"
