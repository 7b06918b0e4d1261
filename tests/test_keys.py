"""Key material and the authentication cache."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, event

from proxy.errors import InvalidKey
from proxy.ledger.key_admin import create_key, revoke_key
from proxy.ledger.keys import KEY_PREFIX, KeyCache, hash_key, key_from_headers, new_key
from proxy.ledger.teams import TeamSettings, create_team

pytestmark = pytest.mark.anyio


def test_keys_are_long_random_and_prefixed() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43 for key in keys)
    assert hash_key("a") != hash_key("b") and len(hash_key("a")) == 64


def test_key_from_either_header() -> None:
    assert key_from_headers({b"x-api-key": b"sk-sg-1"}) == "sk-sg-1"
    assert key_from_headers({b"authorization": b"Bearer sk-sg-2"}) == "sk-sg-2"
    assert key_from_headers({b"authorization": b"Basic abc"}) is None
    assert key_from_headers({}) is None


def count_queries(engine: Engine) -> list[str]:
    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", seen)
    return statements


async def test_one_lookup_per_key_however_many_calls_wait(engine: Engine) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    _, key = create_key(engine, "research", actor="test")
    cache = KeyCache(engine, ttl=60)
    statements = count_queries(engine)
    found: list[str] = []

    async def authenticate() -> None:
        found.append((await cache.authenticate(key)).team)

    async with anyio.create_task_group() as calls:
        for _ in range(20):
            calls.start_soon(authenticate)
    assert found == ["research"] * 20
    # One lookup: the key with its team's rules, then the team's end-user budgets.
    assert len(statements) == 2


async def test_revocation_reaches_the_cache_after_its_ttl(engine: Engine) -> None:
    create_team(engine, "research", TeamSettings(), actor="test")
    view, key = create_key(engine, "research", actor="test")
    now = [0.0]
    cache = KeyCache(engine, ttl=5, clock=lambda: now[0])
    assert (await cache.authenticate(key)).key_id == view.id
    revoke_key(engine, view.id, actor="test")
    assert (await cache.authenticate(key)).key_id == view.id
    now[0] = 6.0
    with pytest.raises(InvalidKey, match="unknown or revoked"):
        await cache.authenticate(key)
    with pytest.raises(InvalidKey, match="No spendgate key was sent"):
        await cache.authenticate(None)


async def test_every_caller_waiting_on_a_failed_lookup_gets_a_503(tmp_path: Any) -> None:
    """Calls that arrive while one lookup runs share its outcome: with the ledger down, the 503 of the spec."""
    from proxy.errors import LedgerUnavailable
    from proxy.ledger.db import make_engine

    broken = make_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'ledger.db'}")
    cache = KeyCache(broken, ttl=5)
    outcomes: list[BaseException] = []

    async def call() -> None:
        try:
            await cache.authenticate("sk-sg-anything")
        except Exception as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as calls:
        for _ in range(5):
            calls.start_soon(call)
    broken.dispose()
    assert len(outcomes) == 5
    assert all(isinstance(outcome, LedgerUnavailable) for outcome in outcomes)
