"""Browser sessions and OIDC sign-ins under way, kept in the ledger so every replica sees the same ones.

Only hashes of the secrets a browser holds are stored: the session cookie, the sign-in `state`. A session is made
fresh by the server at every sign-in (a session id a client brings is never adopted: no fixation), ends when its
person signs out on any replica, and lasts at most `SESSION_SECONDS`. A sign-in state is taken (deleted) by the
first callback that presents it, so a replayed callback finds nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.orm import InstrumentedAttribute

from proxy.ledger.db import write_transaction
from proxy.ledger.keys import hash_key
from proxy.ledger.schema import SignInState, WebSession

SESSION_SECONDS = 8 * 3600
# A person has this long between leaving for the provider and coming back.
SIGN_IN_SECONDS = 600
# Sign-ins under way at once, at most (each a row anyone can make by starting one).
MAX_SIGN_INS = 10_000
ADMIN_TOKEN_ACTOR = "admin-token"  # noqa: S105 (a name, not a secret)


@dataclass(frozen=True, slots=True)
class SessionRow:
    """A live session: who it is, and the CSRF token its forms must carry."""

    actor: str
    csrf: str


@dataclass(frozen=True, slots=True)
class PendingSignIn:
    """What the callback checks against: the nonce the id_token must carry, the PKCE verifier, where to go next."""

    nonce: str
    verifier: str
    return_to: str


def start_session(engine: Engine, actor: str, *, admin_token: str | None = None, replaces: str | None = None) -> str:
    """A new session for `actor`; returns the cookie value. Ends the session `replaces` (the cookie the browser
    had), and sessions past their time."""
    session_id = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    proof = _proof(admin_token, session_id) if admin_token is not None else None
    with write_transaction(engine) as connection:
        connection.execute(delete(WebSession).where(WebSession.expires_at < now))
        if replaces:
            connection.execute(delete(WebSession).where(WebSession.id_hash == hash_key(replaces)))
        connection.execute(
            insert(WebSession).values(
                id_hash=hash_key(session_id),
                actor=actor,
                csrf=secrets.token_urlsafe(32),
                token_proof=proof,
                created_at=now,
                expires_at=now + timedelta(seconds=SESSION_SECONDS),
            )
        )
    return session_id


def find_session(engine: Engine, cookie: str | None, *, admin_token: str | None) -> SessionRow | None:
    """The live session a cookie names, or None. An admin-token session needs the admin token it was made under."""
    if not cookie or len(cookie) > 100:
        return None
    with engine.connect() as connection:
        row = connection.execute(
            select(WebSession.actor, WebSession.csrf, WebSession.token_proof, WebSession.expires_at).where(
                WebSession.id_hash == hash_key(cookie)
            )
        ).first()
    if row is None or row.expires_at <= datetime.now(UTC):
        return None
    if row.actor == ADMIN_TOKEN_ACTOR and (
        admin_token is None or not hmac.compare_digest(row.token_proof or "", _proof(admin_token, cookie))
    ):
        return None
    return SessionRow(actor=row.actor, csrf=row.csrf)


def end_session(engine: Engine, cookie: str) -> None:
    """Sign out: the session is gone on every replica."""
    with write_transaction(engine) as connection:
        connection.execute(delete(WebSession).where(WebSession.id_hash == hash_key(cookie)))


def begin_sign_in(engine: Engine, state: str, pending: PendingSignIn) -> None:
    """Remember a sign-in leaving for the provider under its `state`; forgets sign-ins never completed. Anyone may
    start one without being anybody yet, so at most `MAX_SIGN_INS` are kept: past it the oldest are forgotten (a
    flood makes sign-ins that take longer than it lasts start again, and blocks none)."""
    now = datetime.now(UTC)
    with write_transaction(engine) as connection:
        connection.execute(delete(SignInState).where(SignInState.created_at < now - timedelta(seconds=SIGN_IN_SECONDS)))
        evict_oldest(connection, SignInState.state_hash, SignInState.created_at, keep=MAX_SIGN_INS - 1)
        connection.execute(
            insert(SignInState).values(
                state_hash=hash_key(state),
                nonce=pending.nonce,
                verifier=pending.verifier,
                return_to=pending.return_to,
                created_at=now,
            )
        )


def take_sign_in(engine: Engine, state: str) -> PendingSignIn | None:
    """The sign-in `state` names, removed so it cannot be used twice; None if unknown, used or too old."""
    oldest = datetime.now(UTC) - timedelta(seconds=SIGN_IN_SECONDS)
    with write_transaction(engine) as connection:
        row = connection.execute(
            delete(SignInState)
            .where(SignInState.state_hash == hash_key(state))
            .returning(SignInState.nonce, SignInState.verifier, SignInState.return_to, SignInState.created_at)
        ).first()
    if row is None or row.created_at < oldest:
        return None
    return PendingSignIn(nonce=row.nonce, verifier=row.verifier, return_to=row.return_to)


def evict_oldest(
    connection: Connection, key: InstrumentedAttribute[str], age: InstrumentedAttribute[datetime], *, keep: int
) -> None:
    """Delete the oldest rows of `key`'s table past the newest `keep` (by `age`)."""
    table = key.class_.__table__
    count = connection.execute(select(func.count()).select_from(table)).scalar_one()
    if count > keep:
        oldest = select(key).order_by(age).limit(count - keep).scalar_subquery()
        connection.execute(delete(table).where(key.in_(oldest)))


def _proof(admin_token: str, session_id: str) -> str:
    return hmac.new(admin_token.encode(), session_id.encode(), hashlib.sha256).hexdigest()
