"""Rate leases: calls admitted in memory against this process's parts of the shared token buckets, the lifecycle
of `proxy/gateway/leases/__init__.py`.

Each limit a call counts against (its team's and its key's requests, input tokens and output tokens per minute)
is a bucket in the ledger (`proxy/ledger/rates.py`). A call takes 1 request, its input tokens' pre-call bound
(`input_token_bound`, the body's size: loose, never low for text) and the `max_tokens` it sent. When it ends,
what its usage shows unused goes back to the lease (input counted as Anthropic counts it for its own limits:
uncached input plus cache writes, not cache reads). Every upkeep brings the leases in line with the demand and
tells the ledger what was consumed, all in one transaction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache, partial

import anyio.to_thread
from sqlalchemy import Engine

from proxy.errors import RateLimited
from proxy.gateway.leases.policy import RATE_HORIZON_SECONDS, RATE_SHARE, Demand, grant_size
from proxy.gateway.waits import Turns
from proxy.instruments import Metrics
from proxy.ledger.keys import KeyInfo
from proxy.ledger.rates import RATE_SETTINGS, Exchange, Limit, RateKind, Taken, end_leases, exchange

# After a bucket was found short, for this long calls its estimated refill cannot serve are refused from memory.
ASK_AGAIN_SECONDS = 0.25
# Anthropic's `anthropic-ratelimit-<kind>-limit|remaining|reset` under our own prefix.
HEADER_NAMES: dict[RateKind, tuple[bytes, bytes, bytes]] = {
    "requests": (
        b"x-spendgate-ratelimit-requests-limit",
        b"x-spendgate-ratelimit-requests-remaining",
        b"x-spendgate-ratelimit-requests-reset",
    ),
    "input_tokens": (
        b"x-spendgate-ratelimit-input-tokens-limit",
        b"x-spendgate-ratelimit-input-tokens-remaining",
        b"x-spendgate-ratelimit-input-tokens-reset",
    ),
    "output_tokens": (
        b"x-spendgate-ratelimit-output-tokens-limit",
        b"x-spendgate-ratelimit-output-tokens-remaining",
        b"x-spendgate-ratelimit-output-tokens-reset",
    ),
}
KIND_WORDS: dict[RateKind, str] = {
    "requests": "requests",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}


@lru_cache(maxsize=4096)
def limits_for(key: KeyInfo) -> tuple[Limit, ...]:
    """The rate limits a call with this key counts against: its team's, then its own."""
    limits = []
    for owner, scope, settings in (
        (f"team {key.team}", f"team:{key.team_id}", key.team_rates),
        (f"key {key.key_id}", f"key:{key.key_id}", key.key_rates),
    ):
        for kind, setting in RATE_SETTINGS.items():
            per_minute = getattr(settings, setting)
            if per_minute is not None:
                label = f"{owner}'s {KIND_WORDS[kind]} per minute"
                limits.append(Limit(scope=f"{scope}:{setting}", label=label, kind=kind, per_minute=per_minute))
    return tuple(limits)


@dataclass(slots=True, eq=False)
class RateLease:
    """This process's lease of one bucket, and what it knows of the bucket."""

    limit: Limit
    available: int = 0  # may go below zero when calls used more than their bound: a debt paid from the bucket
    in_flight: int = 0  # bounds of calls admitted and still running
    demand: Demand[int] = field(default_factory=lambda: Demand.none(0))
    level: float = 0.0  # the bucket's level at `seen` (monotonic); a float, as it only feeds estimates
    seen: float = 0.0
    # After an exchange found the bucket short: until then, a call the lease cannot admit is refused from memory
    # when the bucket cannot have refilled enough for it (no transaction per refusal in a storm of them).
    ask_after: float = 0.0

    @property
    def held(self) -> int:
        return max(self.available, 0) + self.in_flight

    def size(self, need: int) -> int:
        """How much to take when `need` more is wanted now."""
        cap = self.limit.per_minute // RATE_SHARE
        return grant_size(need, self.demand.recent(), cap, horizon=RATE_HORIZON_SECONDS)

    def wait(self, amount: int, now: float) -> float:
        """Seconds until the bucket, refilling at its rate from its level at the last exchange, has what a call of
        `amount` needs beyond this lease (other replicas taking or giving back are not foreseen)."""
        level = self.level + self.limit.per_minute / 60 * max(now - self.seen, 0.0)
        return (amount - max(self.available, 0) - level) * 60 / self.limit.per_minute

    def remaining(self, now: float) -> int:
        """An estimate of what the bucket could still give (other replicas' leases are not counted); floats
        are exact enough for a header."""
        per_minute = self.limit.per_minute
        level = min(self.level + per_minute / 60 * max(now - self.seen, 0.0), per_minute)
        return max(0, min(per_minute, self.available + int(level)))

    def saw(self, level: Decimal, now: float) -> None:
        """The bucket's level as an exchange left it."""
        self.level, self.seen = float(level), now


@dataclass(slots=True, kw_only=True)
class Ticket:
    """What an admitted call took from each lease (the same order as its limits)."""

    leases: tuple[RateLease, ...]
    amounts: tuple[int, ...]
    headers: list[tuple[bytes, bytes]]


class RateLeases:
    """This process's leases of the rate-limit buckets: admission on the request path, upkeep in the background."""

    def __init__(self, engine: Engine, *, instance: str, metrics: Metrics, wait_seconds: float | None = None) -> None:
        self._engine = engine
        self._instance = instance
        self._metrics = metrics
        self._wait = wait_seconds
        self._leases: dict[str, RateLease] = {}
        # One exchange at a time: calls short of a lease wait for the exchange in progress, which takes for them. A
        # call whose wait runs out is refused; its exchange still lands.
        self._turns = Turns()

    async def admit(self, key: KeyInfo, *, input_tokens: int, output_tokens: int, at: datetime) -> Ticket | None:
        """Take a call's requests and token bounds from every limit of its key, or raise `RateLimited` (taking
        nothing); None when the key has no rate limit. `at` is when the call arrived: an exchange for it refills the
        buckets only up to then (what calls take is bounded by their own timestamps, up to the time a call waits for
        another's exchange)."""
        limits = limits_for(key)
        if not limits:
            return None
        wanted = {"requests": 1, "input_tokens": input_tokens, "output_tokens": output_tokens}
        # The input bound is loose (bytes): one above a whole limit takes the whole bucket, and the real input is
        # charged when the call ends. Output is bounded by max_tokens itself: above the limit, it can never fit.
        amounts = tuple(
            min(wanted[limit.kind], limit.per_minute) if limit.kind == "input_tokens" else wanted[limit.kind]
            for limit in limits
        )
        for limit, amount in zip(limits, amounts, strict=True):
            if amount > limit.per_minute:
                raise RateLimited(
                    f"This call needs {amount} {KIND_WORDS[limit.kind]}, more than {limit.label} ({limit.per_minute}) "
                    "allows at once, so it can never be admitted. Send a smaller request (lower max_tokens), or ask "
                    "your spendgate admin to raise the limit.",
                    retry=False,
                    headers=tuple(_headers([self._lease(limit) for limit in limits], time.monotonic())),
                )
        leases = tuple(self._lease(limit) for limit in limits)
        while not self._fits(leases, amounts):
            self._refuse_if_known_short(leases, amounts)
            await self._turns.run(partial(self._take_more, limits, amounts, at), self._wait)
            # Looked up again after every wait: the upkeep may have ended a lease, an exchange may have replaced one,
            # and calls that fit kept being admitted during the exchange.
            leases = tuple(self._lease(limit) for limit in limits)
        for part, amount in zip(leases, amounts, strict=True):
            part.available -= amount
            part.in_flight += amount
            part.demand.took(amount)
        return Ticket(leases=leases, amounts=amounts, headers=_headers(leases, time.monotonic()))

    def finished(self, ticket: Ticket, *, input_tokens: int | None, output_tokens: int | None) -> None:
        """A call admitted with `ticket` ended having used these tokens (input as Anthropic counts it for rate limits:
        uncached and cache writes); None where that is not known, so all it took counts as used. What it did not use
        goes back to the leases."""
        used: dict[RateKind, int | None] = {"requests": 1, "input_tokens": input_tokens, "output_tokens": output_tokens}
        for part, amount in zip(ticket.leases, ticket.amounts, strict=True):
            part.in_flight -= amount
            count = used[part.limit.kind]
            if count is not None:
                part.available += amount - count
                if count > amount:
                    part.demand.took(count - amount)  # usage above the bound is demand too

    def cancel(self, ticket: Ticket) -> None:
        """A call admitted with `ticket` was refused before it went out: it consumed nothing."""
        for part, amount in zip(ticket.leases, ticket.amounts, strict=True):
            part.in_flight -= amount
            part.available += amount
            part.demand.gave_back(amount)

    async def upkeep(self) -> None:
        """Keep each lease near the demand (topped up to it, so calls seldom wait for an exchange of their own; given
        back past twice it), end leases nobody used for a while, and write what was consumed (one transaction)."""
        await self._turns.run(self._upkeep, None)

    async def _upkeep(self) -> None:
        now = time.monotonic()
        plans, ended = [], {}
        for scope, part in list(self._leases.items()):
            part.demand.measure()
            idle = part.demand.idle(now) and part.in_flight == 0
            keep = 0 if idle else part.size(0)
            back = max(part.available - keep, 0) if idle or part.available > 2 * keep else 0
            if idle:
                # Out of the leases first, so no call is admitted against it while it ends.
                ended[scope] = self._leases.pop(scope)
            # Whatever the bucket has, up to the demand (need 0: a short bucket is no refusal here).
            top_up = max(keep - max(part.available, 0), 0)
            plans.append((part, back, 0, top_up))
        try:
            await self._exchange(plans, datetime.now(UTC))
        except BaseException:
            for scope, part in ended.items():
                self._leases.setdefault(scope, part)
            raise

    async def close(self) -> None:
        """At a clean exit, once every call has ended: give back every lease."""
        back = {scope: max(part.available, 0) for scope, part in self._leases.items()}
        self._leases.clear()
        await anyio.to_thread.run_sync(end_leases, self._engine, self._instance, back, datetime.now(UTC))

    def forget(self) -> None:
        """Another replica took this process for dead and dropped its leases: start again from nothing."""
        self._leases.clear()

    def _lease(self, limit: Limit) -> RateLease:
        part = self._leases.get(limit.scope)
        if part is None:
            part = self._leases[limit.scope] = RateLease(limit)
            part.saw(Decimal(limit.per_minute), time.monotonic())
        elif part.limit != limit:
            # The limit changed: the same lease (it is one row), sized and refilled by the new limit.
            part.limit = limit
        return part

    @staticmethod
    def _fits(leases: Sequence[RateLease], amounts: Sequence[int]) -> bool:
        return all(part.available >= amount for part, amount in zip(leases, amounts, strict=True))

    def _refuse_if_known_short(self, leases: Sequence[RateLease], amounts: Sequence[int]) -> None:
        """`RateLimited` without asking the ledger, when an exchange found a bucket short a moment ago and, refilled
        at its rate since, it still cannot have what this call needs beyond its lease."""
        now = time.monotonic()
        waits = [
            (part.wait(amount, now), part)
            for part, amount in zip(leases, amounts, strict=True)
            if part.available < amount and now < part.ask_after
        ]
        wait, tightest = max(waits, key=lambda item: item[0], default=(0.0, None))
        if tightest is not None and wait > 0:
            raise _refusal(tightest.limit, wait, leases, now)

    async def _take_more(self, limits: Sequence[Limit], amounts: Sequence[int], at: datetime) -> None:
        """One exchange growing every lease that is short for this call (unless the exchange before it in turn made
        room); `RateLimited` if a bucket cannot."""
        leases = tuple(self._lease(limit) for limit in limits)
        if self._fits(leases, amounts):
            return
        self._refuse_if_known_short(leases, amounts)
        plans, wanted = [], []
        for part, amount in zip(leases, amounts, strict=True):
            need = amount - max(part.available, 0)
            if need > 0:
                plans.append((part, 0, need, part.size(need)))
                wanted.append(amount)
        taken = await self._exchange(plans, at)
        now = time.monotonic()
        waits = []
        for (part, _, need, _), got, amount in zip(plans, taken, wanted, strict=True):
            if got.granted < need:
                current = self._leases.get(part.limit.scope, part)
                current.ask_after = now + ASK_AGAIN_SECONDS
                waits.append((current.wait(amount, now), current))
        if waits:
            wait, tightest = max(waits, key=lambda item: item[0])
            raise _refusal(tightest.limit, wait, leases, now)

    async def _exchange(self, plans: Sequence[tuple[RateLease, int, int, int]], at: datetime) -> list[Taken]:
        """Run one exchange for (lease, give back, need, want) plans, the buckets refilled up to `at`, and apply
        what it took."""
        if not plans:
            return []
        debts = [max(-part.available, 0) for part, *_ in plans]
        for part, back, _, _ in plans:
            part.available -= back
        exchanges = [
            Exchange(limit=part.limit, held=part.held, debt=debt, give_back=back, need=need, want=want)
            for (part, back, need, want), debt in zip(plans, debts, strict=True)
        ]
        try:
            taken = await anyio.to_thread.run_sync(partial(exchange, self._engine, self._instance, exchanges, at))
        except BaseException:
            for part, back, *_ in plans:
                part.available += back
            raise
        self._metrics.round_trips.labels("rate_exchange").inc()
        by_scope = {item.scope: item for item in taken}
        now = time.monotonic()
        results = []
        for (part, *_), debt in zip(plans, debts, strict=True):
            got = by_scope[part.limit.scope]
            if got.forfeited:
                # Taken for dead and dropped as consumed: what the old lease held (and its calls in flight give
                # back) is nobody's now. A fresh lease holds only what was granted.
                fresh = RateLease(part.limit, available=got.granted)
                fresh.saw(got.level, now)
                if self._leases.get(part.limit.scope) is part:
                    self._leases[part.limit.scope] = fresh
                part = fresh
            else:
                part.available += debt + got.granted
                part.saw(got.level, now)
            results.append(got)
        return results


def _refusal(limit: Limit, wait: float, leases: Sequence[RateLease], now: float) -> RateLimited:
    retry_after = max(1, math.ceil(wait))
    return RateLimited(
        f"This call would exceed {limit.label} ({limit.per_minute}). Retry after {retry_after} seconds.",
        retry_after=retry_after,
        headers=tuple(_headers(leases, now)),
    )


def _headers(leases: Sequence[RateLease], now: float) -> list[tuple[bytes, bytes]]:
    """`x-spendgate-ratelimit-<kind>-limit|remaining|reset` for the tightest limit of each kind (Anthropic's
    `anthropic-ratelimit-*` under our own prefix): remaining is an estimate (other replicas' leases are not seen),
    reset is when the bucket would be full again (RFC 3339). On every admitted call: kept cheap."""
    tightest: dict[RateKind, tuple[int, RateLease]] = {}
    for part in leases:
        remaining = part.remaining(now)
        if part.limit.kind not in tightest or remaining < tightest[part.limit.kind][0]:
            tightest[part.limit.kind] = (remaining, part)
    headers = []
    wall = time.time()
    for kind, (remaining, part) in tightest.items():
        limit, left, reset = HEADER_NAMES[kind]
        per_minute = part.limit.per_minute
        headers += [
            (limit, b"%d" % per_minute),
            (left, b"%d" % remaining),
            (reset, _rfc3339(math.ceil(wall + (per_minute - remaining) * 60 / per_minute))),
        ]
    return headers


@lru_cache(maxsize=1024)
def _rfc3339(second: int) -> bytes:
    """A Unix second as RFC 3339 UTC: the same few seconds come up call after call."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)).encode()
