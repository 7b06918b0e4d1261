"""Admission: who is calling, what they sent, and whether their team's rules let it go out.

The gate is the only code on the request path that asks the ledger anything, and every such question goes
through `ledger`, so a database failure always becomes the same 503. Identity comes first, from the headers
alone: nobody gets a byte of body read, or a batch looked up, without a valid key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import cache, partial
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine

from proxy.errors import (
    BadRequest,
    BatchNotFound,
    BudgetExceeded,
    LedgerUnavailable,
    OutputCapExceeded,
    UnpricedModel,
    ledger_errors,
)
from proxy.gateway.bodies import Bodies
from proxy.gateway.call import ID_LIMIT, Call, label
from proxy.gateway.claude_code import parse_user_id
from proxy.gateway.leases.lifecycle import Leases
from proxy.gateway.leases.rate import Ticket
from proxy.gateway.limits import CappedRequest, cap_output, check_model, most_tokens_within
from proxy.gateway.validate import OutputLimits, check_batch_request, check_message_request, parse_object
from proxy.gateway.waits import bounded, bounded_take
from proxy.instruments import Metrics
from proxy.ledger.batch_owners import BatchOwner, find_batch
from proxy.ledger.budgets import release, take_hold
from proxy.ledger.counters import counters_for
from proxy.ledger.keys import KeyCache, KeyInfo, key_from_headers
from proxy.ledger.people import PERSON_PREFIX
from proxy.ledger.retries import fingerprint_request
from proxy.pricing.estimate import estimate_cost, input_token_bound
from proxy.pricing.table import PriceTable
from proxy.types import Hold, HoldOwner, UsageRecord

logger = logging.getLogger("spendgate")
T = TypeVar("T")
ZERO = Decimal(0)
# A batch can take 24 hours to end and its results are read later: its hold lasts two days unless settled.
BATCH_HOLD = timedelta(hours=48)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateRules:
    """The gate's settings: body limits and timing, output caps, hold lifetimes, the fail-open switch."""

    max_body_bytes: int
    body_timeout_seconds: float
    default_max_output_tokens: int | None
    reservation_ttl: timedelta
    fail_open: bool
    instance: str  # the serving process whose holds these are
    # The longest a call waits for an answer the ledger owes it before it is refused 503.
    ledger_wait_seconds: float = 5.0


class Gate:
    """Authenticates, reads and validates the body, applies the team's rules, and takes the budget hold."""

    def __init__(
        self,
        *,
        keys: KeyCache,
        prices: PriceTable,
        engine: Engine,
        leases: Leases,
        rules: GateRules,
        metrics: Metrics,
    ) -> None:
        self._keys = keys
        self._metrics = metrics
        self._budgets = leases.budgets
        self._rates = leases.rates
        self._prices = prices
        self._engine = engine
        self._rules = rules
        self._limits = OutputLimits.load()
        self.bodies = Bodies(max_body_bytes=rules.max_body_bytes, timeout_seconds=rules.body_timeout_seconds)

    async def authenticate(self, call: Call, headers: dict[bytes, bytes]) -> KeyInfo:
        """The caller's key (or `InvalidKey`), from the headers alone."""
        key = await self._keys.authenticate(key_from_headers(headers))
        call.key = key
        if key.owner is not None:
            # A personal key's calls are its person's: their allowance applies, whatever the client says.
            call.user = key.owner
        _check_claimed_user(call.user, key)
        return key

    async def admit_message(self, call: Call, key: KeyInfo, body: bytes, *, tokens: bool) -> bytes:
        """Validate a Messages (or, `tokens` false, token-counting) request and, for Messages, apply the team's
        rules and hold its worst case; returns the body to forward (rewritten only when the cap clamped it)."""
        request = parse_object(body, "a Messages API request")
        check_message_request(request, self._limits, tokens=tokens)
        call.model = request["model"]
        call.streamed = request.get("stream") is True
        if call.user is None or call.session is None:
            _take_metadata(call, key, request.get("metadata"))
        if not tokens:
            return body
        call.max_tokens = call.max_tokens_sent = request["max_tokens"]
        call.fingerprint = fingerprint_request(request, user=call.user)
        check_model(call.model, key.models, key.team)
        capped = cap_output(request, body, cap=self._cap(key), policy=key.cap_policy, team=key.team)
        call.max_tokens_sent = capped.max_tokens
        input_tokens = input_token_bound(request, len(capped.body))
        # Rate limits first: they are answered from memory, and a call they refuse takes no budget hold.
        ticket = await self._rate_limit(call, key, input_tokens, capped.max_tokens or 0)
        call.estimate = estimate = cache(
            partial(
                estimate_cost,
                request,
                model=call.model or "",
                input_tokens=input_tokens,
                max_tokens=capped.max_tokens,
                prices=self._prices,
                at=call.started_at,
            )
        )
        try:
            try:
                await self._hold_worst_case(
                    call, key, estimate, ttl=self._rules.reservation_ttl, what=f"Model {call.model!r}", lease=True
                )
            except BudgetExceeded as refused:
                capped = await self._clamp_at_edge(call, key, request, input_tokens, refused)
                if ticket is not None:
                    # The call can use no more output than it is now sent with: the rest goes back to the limit.
                    self._rates.cancel(ticket)
                    ticket = None  # cancelled once: a refusal of the new one below must not cancel it again
                    ticket = await self._rate_limit(call, key, input_tokens, capped.max_tokens or 0)
        except BaseException:
            if ticket is not None:
                self._rates.cancel(ticket)
            raise
        call.ticket = ticket
        return capped.body

    async def _clamp_at_edge(
        self, call: Call, key: KeyInfo, request: dict[str, Any], input_tokens: int, refused: BudgetExceeded
    ) -> CappedRequest:
        """For a team that clamps at the budget edge, the request with the largest `max_tokens` (at least
        `MIN_EDGE_TOKENS`) whose worst case the tightest window can still pay, held; else `refused` stands."""
        if key.budget_edge != "clamp" or refused.left is None or call.max_tokens_sent is None:
            raise refused

        def worst(max_tokens: int) -> Decimal | None:
            return estimate_cost(
                request,
                model=call.model or "",
                input_tokens=input_tokens,
                max_tokens=max_tokens,
                prices=self._prices,
                at=call.started_at,
            )

        fits = most_tokens_within(worst, refused.left, below=call.max_tokens_sent)
        if fits is None:
            raise refused
        try:
            clamped = cap_output(request, b"", cap=fits, policy="clamp", team=key.team)
        except OutputCapExceeded:
            raise refused from None  # extended thinking needs more room than the budget leaves
        call.max_tokens_sent = fits
        call.estimate = estimate = cache(partial(worst, fits))
        # Its own hold, exact under the counters' locks: another call may have taken what was left meanwhile.
        await self._hold_worst_case(
            call, key, estimate, ttl=self._rules.reservation_ttl, what=f"Model {call.model!r}", lease=False
        )
        return clamped

    async def admit_batch(self, call: Call, key: KeyInfo, body: bytes) -> bytes:
        """Validate a batch create, apply the allow-list and cap to every request, and hold the batch's worst case
        at batch rates; returns the body to forward. The body can be 256 MB: it is parsed, checked and priced in a
        thread, so the event loop goes on serving meanwhile."""
        body, estimate = await anyio.to_thread.run_sync(self._check_batch, call, key, body)
        await self._hold_worst_case(
            call, key, lambda: estimate, ttl=BATCH_HOLD, what="A model in this batch", lease=False
        )
        return body

    def _check_batch(self, call: Call, key: KeyInfo, body: bytes) -> tuple[bytes, Decimal | None]:
        """The body to forward and the batch's worst case (blocking: CPU only)."""
        request = parse_object(body, "a Message Batches create request")
        requests = check_batch_request(request, self._limits)
        capped_requests, clamped = [], False
        for item in requests:
            params = item["params"]
            check_model(params["model"], key.models, key.team)
            capped = cap_output(params, b"", cap=self._cap(key), policy=key.cap_policy, team=key.team)
            if capped.body:
                item, clamped = {**item, "params": json.loads(capped.body)}, True
            capped_requests.append(item)
        if clamped:
            request = {**request, "requests": capped_requests}
            body = json.dumps(request, separators=(",", ":")).encode()
        return body, _estimate_batch(capped_requests, self._prices, call)

    async def owner(self, key: KeyInfo, batch_id: str) -> BatchOwner:
        """The batch, if the caller's team created it through spendgate; `BatchNotFound` otherwise."""
        owner = await self.ledger(partial(find_batch, self._engine, batch_id))
        if owner is None or owner.team_id != key.team_id:
            raise BatchNotFound(
                f"No batch {batch_id} was created through spendgate by team {key.team}. "
                "Batches are visible only to the team that created them."
            )
        return owner

    async def ledger(self, work: Callable[[], T]) -> T:
        """Run blocking ledger work in a thread, waited for at most the ledger wait; a database failure (or no
        answer in time) becomes a 503 in Anthropic's shape."""
        with ledger_errors():
            return await bounded(anyio.to_thread.run_sync(work), self._rules.ledger_wait_seconds)

    async def _rate_limit(self, call: Call, key: KeyInfo, input_tokens: int, output_tokens: int) -> Ticket | None:
        """Take the call's share of its rate limits (`RateLimited` if it does not fit)."""
        try:
            with ledger_errors("The spend ledger did not answer, so the rate limit could not be checked."):
                return await self._rates.admit(
                    key, input_tokens=input_tokens, output_tokens=output_tokens, at=call.started_at
                )
        except LedgerUnavailable:
            if not self._rules.fail_open:
                raise
            logger.warning("ledger unreachable; forwarding %s without a rate-limit check (fail-open)", call.id)
            return None

    def _cap(self, key: KeyInfo) -> int | None:
        return key.max_output_tokens if key.max_output_tokens is not None else self._rules.default_max_output_tokens

    def finished(self, call: Call, record: UsageRecord) -> None:
        """A call's record is made: what it took from a lease and from rate limits is settled in memory."""
        self._budgets.finished(record)
        if call.ticket is None:
            return
        if not call.forwarded:
            self._rates.cancel(call.ticket)
            return
        usage = call.usage
        if usage is None:
            # An error answer generated nothing; a call cut off before its usage arrived may have used it all.
            tokens = 0 if call.facts.status >= 400 else None
            self._rates.finished(call.ticket, input_tokens=tokens, output_tokens=tokens)
            return
        # A stream that did not end normally reported its output only so far (the model may have gone on).
        output_known = record.outcome == "ok" or not call.streamed
        self._rates.finished(
            call.ticket,
            input_tokens=usage.input_tokens
            + usage.cache_creation_5m_input_tokens
            + usage.cache_creation_1h_input_tokens,
            output_tokens=usage.output_tokens if output_known else None,
        )

    async def _hold_worst_case(
        self,
        call: Call,
        key: KeyInfo,
        estimate: Callable[[], Decimal | None],
        *,
        ttl: timedelta,
        what: str,
        lease: bool,
    ) -> None:
        """Hold the call's worst case on its budgets (against this process's lease when `lease` and the budgets
        are large enough, else a hold of its own); counters without a budget just record its spend later."""
        counters = counters_for(key, call.started_at, call.user)
        if all(counter.budget_usd is None for counter in counters):
            call.hold = Hold(call_id=call.id, counters=counters, amount=ZERO, held=False)
            return
        amount = estimate()
        if amount is None:
            raise UnpricedModel(
                f"{what} has no price, so team {key.team}'s budget cannot bound this call. Add the model to a price "
                "table named by SPENDGATE_PRICES (see `spendgate prices`), or use a priced model."
            )
        if amount < 0:
            # Validation admits only positive max_tokens, so this is a bug; a negative hold would let other
            # calls overspend while it runs, so the call does not go out.
            raise RuntimeError(f"negative worst case {amount} for {call.id}")
        try:
            with ledger_errors(
                "The spend ledger did not answer, so the budget could not be checked and the call was not sent."
            ):
                if lease:
                    leased = await self._budgets.admit(key, counters, amount, endpoint=call.endpoint)
                    if leased is not None:
                        call.hold = Hold(call_id=call.id, counters=counters, amount=amount, held=False, lease=leased)
                        self._metrics.leased.inc()
                        return
                hold = Hold(call_id=call.id, counters=counters, amount=amount, held=True)
                owner = HoldOwner(
                    instance_id=self._rules.instance,
                    team=key.team,
                    key_id=key.key_id,
                    endpoint=call.endpoint,
                    model=call.model,
                    user=call.user,
                    feature=call.feature,
                    session=call.session,
                    agent=call.agent,
                    parent_agent=call.parent_agent,
                )
                take = partial(
                    take_hold,
                    self._engine,
                    hold,
                    expires_at=call.started_at + ttl,
                    started_at=call.started_at,
                    owner=owner,
                )
                # A hold that lands after the call was refused is given back at once.
                give_back = partial(release, self._engine, [call.id])
                await bounded_take(take, give_back, self._rules.ledger_wait_seconds)
                self._metrics.hold_trips.inc()
                self._metrics.held.inc()
        except LedgerUnavailable:
            if not self._rules.fail_open:
                raise
            logger.warning("ledger unreachable; forwarding %s without a budget check (fail-open)", call.id)
            hold = Hold(call_id=call.id, counters=counters, amount=ZERO, held=False)
        call.hold = hold


def _estimate_batch(requests: list[dict[str, Any]], prices: PriceTable, call: Call) -> Decimal | None:
    """The most a batch can cost: every request's worst case at batch rates; None if any model is unpriced."""
    total = ZERO
    for item in requests:
        params = item["params"]
        estimate = estimate_cost(
            params,
            model=params["model"],
            input_tokens=input_token_bound(params, _size(params)),
            max_tokens=params["max_tokens"],
            prices=prices,
            at=call.started_at,
            batch=True,
        )
        if estimate is None:
            return None
        total += estimate
    return total


def _size(params: dict[str, Any]) -> int:
    try:
        return len(json.dumps(params))
    except RecursionError:
        raise BadRequest("A batch request is nested too deeply to be read.") from None


def _take_metadata(call: Call, key: KeyInfo, metadata: Any) -> None:
    """The user (unless a header or a personal key named one) and the session (unless a header named one) that
    the body's `metadata.user_id` gives: Claude Code's says both, any other string is the user as it is."""
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return
    claude_code = parse_user_id(user_id)
    if claude_code is None:
        if call.user is None:
            call.user = label(user_id, 256)
            _check_claimed_user(call.user, key)
        return
    if call.user is None and claude_code.user is not None:
        call.user = label(claude_code.user, 256)
        _check_claimed_user(call.user, key)
    if call.session is None and claude_code.session is not None:
        call.session = label(claude_code.session, ID_LIMIT)


def _check_claimed_user(user: str | None, key: KeyInfo) -> None:
    """`oidc:` names a person the identity provider vouched for: only their personal key may speak for them, so a
    client of a shared key cannot spend a person's allowance or put their name on its calls."""
    if key.owner is None and user is not None and user.startswith(PERSON_PREFIX):
        raise BadRequest(
            f"The user {user[:80]!r} names a signed-in person: 'oidc:' users are set by personal keys only. "
            "Send another x-spendgate-user (or metadata.user_id), or call with that person's own key."
        )
