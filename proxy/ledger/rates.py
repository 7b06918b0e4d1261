"""Rate limits in the ledger: one token bucket per limit, shared by every replica.

A limit of N per minute is Anthropic's model: a bucket of capacity N refilled continuously at N/60 per second.
Replicas do not ask the bucket for every call: each leases part of it in one transaction (a row of `rate_leases`)
and admits calls against the lease in memory (`proxy/gateway/leases/rate.py`).

Why it cannot let through more than the bucket: the bucket refills only while its level plus everything the
replicas hold stays within the capacity, and a lease leaves the rows only when it is given back (to the level)
or known consumed. A lease is written as it was at the process's last exchange; it only shrinks in between
(calls consume it), so the rows never understate it and the refill is never larger than the true bucket's. So in
any window of T seconds the calls admitted take at most what was in the bucket or held at its start (<= N) plus
the refill (N x T/60): N x (1 + T/60), across any number of replicas. A process that dies leaves its lease in
the rows until the heartbeat reaper deletes it, treated as consumed: the bucket then refills without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from proxy.ledger.db import write_transaction
from proxy.ledger.schema import Instance, RateBucket, RateLease

RateKind = Literal["requests", "input_tokens", "output_tokens"]
# The setting of each kind, as the CLI, the admin API and the ledger columns name it.
RATE_SETTINGS: dict[RateKind, str] = {"requests": "rpm", "input_tokens": "itpm", "output_tokens": "otpm"}
ZERO = Decimal(0)
SECONDS_PER_MINUTE = Decimal(60)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One rate limit: a team's or a key's requests, input tokens or output tokens per minute."""

    scope: str  # "team:<id>:rpm", "key:<id>:otpm", ...
    label: str  # how refusals name it: "team research's output tokens per minute"
    kind: RateKind
    per_minute: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """What one process does with one bucket in one transaction.

    `held` is what the process holds out of the bucket after the exchange's give-back (unused lease plus the
    bounds of its calls in flight); `debt` is what its calls consumed beyond what they had taken (a usage above
    its pre-call bound), paid from the level; `give_back` goes back into the level; then `want` is taken if the
    level has at least `need` of it (`need` <= `want`), else nothing.
    """

    limit: Limit
    held: int
    debt: int = 0
    give_back: int = 0
    need: int = 0
    want: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Taken:
    """What an exchange took from a bucket, and the bucket's level after it. `forfeited`: the process's lease
    was gone from the ledger (a reaper took it for dead and dropped it as consumed), so nothing it held was given
    back or kept: its lease must start again from what was granted now."""

    scope: str
    granted: int
    level: Decimal
    forfeited: bool = False


def exchange(engine: Engine, instance: str, exchanges: Sequence[Exchange], now: datetime) -> list[Taken]:
    """Refill the buckets, then apply each exchange under the buckets' locks; one transaction (blocking)."""
    if not exchanges:
        return []
    by_scope = {item.limit.scope: item for item in exchanges}
    taken = []
    with write_transaction(engine) as connection:
        _create(connection, [item.limit for item in exchanges], now)
        levels = _refill(connection, sorted(by_scope), now)
        leased = _leased(connection, sorted(by_scope))
        query = select(RateLease.scope, RateLease.amount).where(
            RateLease.instance_id == instance, RateLease.scope.in_(sorted(by_scope))
        )
        mine = {scope: amount for scope, amount in connection.execute(query)}
        for scope, level in levels.items():
            item = by_scope[scope]
            forfeited = item.held > 0 and scope not in mine
            held, give_back = (0, 0) if forfeited else (item.held, item.give_back)
            others = leased.get(scope, 0) - mine.get(scope, 0)
            # A lowered limit takes effect at once (the level may go below zero until the refill brings it back).
            level = min(level, Decimal(item.limit.per_minute - others - mine.get(scope, 0)))
            level = level - item.debt + give_back
            granted = 0
            if item.want > 0 and level >= item.need:
                granted = min(item.want, int(level.to_integral_value(ROUND_FLOOR)))
            level -= granted
            # Never more in the bucket and the leases together than the capacity, whatever happened before.
            level = min(level, Decimal(item.limit.per_minute - others - held - granted))
            _hold(connection, scope, instance, held + granted)
            connection.execute(
                update(RateBucket).where(RateBucket.scope == scope).values(level=level, capacity=item.limit.per_minute)
            )
            taken.append(Taken(scope=scope, granted=granted, level=level, forfeited=forfeited))
    return taken


def end_leases(engine: Engine, instance: str, give_back: dict[str, int], now: datetime) -> None:
    """A clean exit: give back what this process's leases still had unused, and drop them (blocking)."""
    with write_transaction(engine) as connection:
        levels = _refill(connection, _scopes_of(connection, [instance]), now)
        for scope, level in levels.items():
            back = give_back.get(scope, 0)
            if back:
                connection.execute(update(RateBucket).where(RateBucket.scope == scope).values(level=level + back))
        connection.execute(delete(RateLease).where(RateLease.instance_id == instance))


def drop_leases(connection: Connection, instances: Sequence[str], now: datetime) -> None:
    """Forget the leases of dead processes, and of processes that no longer exist (one whose clean exit could not
    give them back), as consumed (their calls may have gone out): in the caller's transaction. The buckets are
    refilled up to now first, while those leases still count against them."""
    orphans = select(RateLease.instance_id).where(
        ~select(Instance.id).where(Instance.id == RateLease.instance_id).exists()
    )
    gone = sorted({*instances, *connection.execute(orphans.distinct()).scalars()})
    if not gone:
        return
    _refill(connection, _scopes_of(connection, gone), now)
    connection.execute(delete(RateLease).where(RateLease.instance_id.in_(gone)))


def _create(connection: Connection, limits: Sequence[Limit], now: datetime) -> None:
    """Create missing buckets, full."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(
        dialect.insert(RateBucket).on_conflict_do_nothing(),
        [
            {"scope": limit.scope, "level": Decimal(limit.per_minute), "capacity": limit.per_minute, "updated_at": now}
            for limit in limits
        ],
    )


def _refill(connection: Connection, scopes: Sequence[str], now: datetime) -> dict[str, Decimal]:
    """Lock the buckets (in scope order, so two transactions never deadlock) and refill each up to `now` by its
    capacity, never past the capacity less what the leases (as written) still count: the level only ever rises
    here, at the bucket's rate, so this is the one place the bound is kept. Returns the levels."""
    if not scopes:
        return {}
    rows = connection.execute(
        select(RateBucket.scope, RateBucket.level, RateBucket.capacity, RateBucket.updated_at)
        .where(RateBucket.scope.in_(scopes))
        .order_by(RateBucket.scope)
        .with_for_update()
    ).all()
    leased = _leased(connection, scopes)
    levels = {}
    for scope, level, capacity, updated_at in rows:
        elapsed = max(Decimal((now - updated_at).total_seconds()), ZERO)
        room = Decimal(capacity - leased.get(scope, 0))
        if level < room:
            level = min(level + Decimal(capacity) / SECONDS_PER_MINUTE * elapsed, room)
        levels[scope] = level
        connection.execute(
            update(RateBucket).where(RateBucket.scope == scope).values(level=level, updated_at=max(now, updated_at))
        )
    return levels


def _scopes_of(connection: Connection, instances: Sequence[str]) -> list[str]:
    query = select(RateLease.scope).where(RateLease.instance_id.in_(instances)).distinct()
    return sorted(connection.execute(query).scalars())


def _leased(connection: Connection, scopes: Sequence[str]) -> dict[str, int]:
    rows = connection.execute(
        select(RateLease.scope, func.sum(RateLease.amount)).where(RateLease.scope.in_(scopes)).group_by(RateLease.scope)
    )
    return {scope: int(total) for scope, total in rows}


def _hold(connection: Connection, scope: str, instance: str, amount: int) -> None:
    where = RateLease.scope == scope, RateLease.instance_id == instance
    if amount <= 0:
        connection.execute(delete(RateLease).where(*where))
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(RateLease).values(scope=scope, instance_id=instance, amount=amount)
    connection.execute(
        statement.on_conflict_do_update(index_elements=["scope", "instance_id"], set_={"amount": amount})
    )
