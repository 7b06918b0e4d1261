"""Client keys: how they are made, stored (hashed) and checked on every call without a database round trip."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import anyio.to_thread
from sqlalchemy import ColumnElement, Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute

from proxy.errors import InvalidKey, LedgerUnavailable
from proxy.ledger.people import is_member
from proxy.ledger.schema import APIKey, Team, UserBudget
from proxy.ledger.windows import WINDOW_COLUMNS, windows_of
from proxy.types import NO_RATE_LIMITS, BudgetEdge, CapPolicy, Period, RateLimits, Windows

KEY_PREFIX = "sk-sg-"
# 32 random bytes: 256 bits, well above the 128 a guessable key would need to resist brute force.
KEY_BYTES = 32
MAX_CACHED_KEYS = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyInfo:
    """Who a valid key belongs to and the rules its calls obey: what a call needs to be attributed and limited."""

    key_id: str
    team_id: int
    team: str
    # Each budget's windows (`proxy/ledger/windows.py`) and its shorthand period, counted with a budget or not.
    team_windows: Windows = field(default_factory=dict, hash=False, compare=False)
    team_period: Period = "month"
    key_windows: Windows = field(default_factory=dict, hash=False, compare=False)
    key_period: Period = "month"
    budget_edge: BudgetEdge = "refuse"
    max_output_tokens: int | None = None
    cap_policy: CapPolicy = "clamp"
    models: tuple[str, ...] | None = None
    retry_window_seconds: int = 600
    team_rates: RateLimits = NO_RATE_LIMITS
    key_rates: RateLimits = NO_RATE_LIMITS
    # Each end user's budget windows (none: no end-user budgets), and the windows of the users with their own.
    user_windows: Windows = field(default_factory=dict, hash=False, compare=False)
    user_budgets: dict[str, Windows] = field(default_factory=dict, hash=False, compare=False)
    # A personal key's person (`oidc:<sub>`): the user of every call made with it.
    owner: str | None = None
    # Unix time after which the key is refused; None: never.
    expires_at: float | None = None


def new_key() -> str:
    """A fresh client key: a recognizable prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def new_key_id() -> str:
    """The public id of a key, safe to show and log."""
    return "key_" + secrets.token_hex(8)


def hash_key(secret: str) -> str:
    """What the ledger stores instead of a secret it handed out (a key, a refresh token, a browser session, a device
    code): each is 256 random bits, so a plain SHA-256 is enough, with no salt or stretching. Any text a client
    sends hashes (lone surrogates replaced), so a guess that cannot be one of ours is only not found."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def key_from_headers(headers: dict[bytes, bytes]) -> str | None:
    """The client key from `x-api-key` or `Authorization: Bearer` (the SDKs send one or the other)."""
    key = headers.get(b"x-api-key")
    if key:
        return key.decode("latin-1").strip()
    authorization = headers.get(b"authorization")
    if authorization and authorization[:7].lower() == b"bearer ":
        return authorization[7:].decode("latin-1").strip()
    return None


def lookup_key(engine: Engine, key_hash: str) -> KeyInfo | None:
    """Find an unrevoked key by its hash (blocking: call it from a worker thread). A personal key whose person no
    longer belongs to its team (their groups no longer map to it) is no key."""
    info = _find_key(engine, APIKey.key_hash == key_hash, APIKey.revoked_at.is_(None))
    if info is not None and info.owner is not None:
        with engine.connect() as connection:
            if not is_member(connection, info.owner, info.team_id):
                return None
    return info


def lookup_key_by_id(engine: Engine, key_id: str) -> KeyInfo | None:
    """Find a key by its id, revoked or not: the rules its past calls were made under (blocking)."""
    return _find_key(engine, APIKey.id == key_id)


def _find_key(engine: Engine, *conditions: ColumnElement[bool]) -> KeyInfo | None:
    query = (
        select(
            APIKey.id,
            APIKey.period,
            Team.id,
            Team.name,
            Team.period,
            Team.max_output_tokens,
            Team.cap_policy,
            Team.models,
            Team.retry_window_seconds,
            Team.budget_edge,
            Team.rpm,
            Team.itpm,
            Team.otpm,
            APIKey.rpm,
            APIKey.itpm,
            APIKey.otpm,
            APIKey.owner,
            APIKey.expires_at,
            *budget_columns(APIKey),
            *budget_columns(Team),
            *budget_columns(Team, "user_"),
        )
        .join(Team, Team.id == APIKey.team_id)
        .where(*conditions)
    )
    with engine.connect() as connection:
        row = connection.execute(query).first()
        if row is None:
            return None
        (
            key_id,
            key_period,
            team_id,
            team,
            team_period,
            cap,
            policy,
            models,
            window,
            edge,
            team_rpm,
            team_itpm,
            team_otpm,
            key_rpm,
            key_itpm,
            key_otpm,
            owner,
            expires_at,
            *amounts,
        ) = row
        key_windows, team_windows, user_windows = (
            windows_of(period, *amounts[first : first + 4])
            for first, period in ((0, key_period), (4, team_period), (8, team_period))
        )
        overrides = connection.execute(
            select(UserBudget.user, *budget_columns(UserBudget)).where(UserBudget.team_id == team_id)
        )
        user_budgets = {user: windows_of(team_period, *own) for user, *own in overrides}
    return KeyInfo(
        key_id=key_id,
        team_id=team_id,
        team=team,
        team_windows=team_windows,
        team_period=team_period,
        key_windows=key_windows,
        key_period=key_period,
        budget_edge=edge,
        max_output_tokens=cap,
        cap_policy=policy,
        models=tuple(models.split(",")) if models is not None else None,
        retry_window_seconds=window,
        team_rates=RateLimits(rpm=team_rpm, itpm=team_itpm, otpm=team_otpm),
        key_rates=RateLimits(rpm=key_rpm, itpm=key_itpm, otpm=key_otpm),
        user_windows=user_windows,
        user_budgets=user_budgets,
        owner=owner,
        expires_at=expires_at.timestamp() if expires_at is not None else None,
    )


def budget_columns(
    table: type[APIKey | Team | UserBudget], prefix: str = ""
) -> tuple[InstrumentedAttribute[Decimal | None], ...]:
    """A table's budget-window columns: the shorthand budget, then the daily, weekly and monthly ones."""
    return tuple(getattr(table, f"{prefix}{column}") for column in ("budget_usd", *WINDOW_COLUMNS.values()))


class KeyCache:
    """Answers "whose key is this?" from memory, asking the ledger at most once per key per `ttl` seconds.

    Unknown keys are cached too, so a client hammering with a bad key costs no database round trips.
    A revocation made on any replica takes effect here within `ttl` seconds. When an entry expires under
    load, one lookup refreshes it and the calls arriving meanwhile wait for that one.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._ttl = ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}
        self._lookups: dict[str, asyncio.Future[KeyInfo | None]] = {}

    async def authenticate(self, key: str | None) -> KeyInfo:
        """The key's owner, or `InvalidKey`."""
        if not key:
            raise InvalidKey(
                "No spendgate key was sent. Pass your spendgate key as the SDK's api_key "
                "(x-api-key header) or as 'Authorization: Bearer <key>'."
            )
        key_hash = hash_key(key)
        now = self._clock()
        cached = self._entries.get(key_hash)
        if cached is not None and cached[0] > now:
            info = cached[1]
        else:
            info = await self._lookup(key_hash, now)
        if info is None:
            raise InvalidKey("This spendgate key is unknown or revoked. Ask your spendgate admin for a valid key.")
        # Checked on every call, cached or not: an expiry is known in advance, unlike a revocation.
        if info.expires_at is not None and info.expires_at <= self._wall_clock():
            raise InvalidKey(
                "This spendgate key has expired. Get a new one: `spendgate login` (or `spendgate key-helper`) for "
                "a personal key, else ask your spendgate admin."
            )
        return info

    async def _lookup(self, key_hash: str, now: float) -> KeyInfo | None:
        pending = self._lookups.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyInfo | None] = asyncio.get_running_loop().create_future()
        self._lookups[key_hash] = future
        try:
            info = await anyio.to_thread.run_sync(lookup_key, self._engine, key_hash)
        except SQLAlchemyError as exc:
            # Every caller waiting on this lookup gets the same answer: the ledger is unavailable, a 503.
            unavailable = LedgerUnavailable("The spend ledger did not answer, so the key could not be checked.")
            future.set_exception(unavailable)
            future.exception()
            raise unavailable from exc
        except Exception as exc:
            future.set_exception(exc)
            # Waiters get the error; nobody else may be waiting, so mark it retrieved.
            future.exception()
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._lookups[key_hash]
        future.set_result(info)
        if len(self._entries) >= MAX_CACHED_KEYS:
            self._entries.clear()
        self._entries[key_hash] = (now + self._ttl, info)
        return info

    def forget(self, key_id: str) -> None:
        """Drop a key from this replica's cache at once (after a revocation made here)."""
        self._entries = {h: e for h, e in self._entries.items() if e[1] is None or e[1].key_id != key_id}
