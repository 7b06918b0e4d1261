"""One call: the facts gathered as it passes through, the outcome they decide, and the usage record they make.

Live calls and batch results become records through the same two functions: `decide_outcome` (pure, a
function of what happened) and `make_record`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.gateway.leases.rate import Ticket
from proxy.gateway.usage import MessageSummary
from proxy.ledger.keys import KeyInfo
from proxy.pricing.table import PriceTable
from proxy.types import COUNT_TOKENS, Cost, Hold, Outcome, Usage, UsageRecord

ZERO = Decimal(0)


class _CallIds:
    """Record ids unique across processes without a system call each: 48 random bits drawn once per process
    (again in a forked child), then a counter."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = "sgr_" + secrets.token_hex(6)
        self._next = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._next) & 0xFFFFFFFFFFFF:012x}"


new_call_id = _CallIds()
# The largest count an INTEGER column holds; larger client-sent numbers are not stored as counts.
MAX_COUNT = 2**31 - 1
# The longest session or agent id kept (the columns' size).
ID_LIMIT = 200


@dataclass(slots=True, kw_only=True)
class Facts:
    """What happened to a call, as far as its outcome is concerned."""

    refusal: ProxyError | None = None  # the proxy answered with an error of its own
    crashed: bool = False  # a bug of ours ended the call
    interrupted: bool = False  # cancelled by the server's shutdown before it ended
    disconnected: bool = False  # the client went away first
    cut: ProxyError | None = None  # the upstream failed after the answer had started
    status: int = 0  # the upstream's status
    error_type: str | None = None  # the upstream's error type (an error body, or `event: error` in a stream)
    complete: bool = True  # the response reached its end (`message_stop` for a Messages stream)


def decide_outcome(facts: Facts) -> tuple[Outcome, str | None]:
    """The outcome of a call and its `error_type`, from the facts alone (the spec's outcome rules, in order)."""
    if facts.refusal is not None:
        unreachable = isinstance(facts.refusal, UpstreamUnreachable | UpstreamTimeout)
        return ("upstream_unreachable" if unreachable else "rejected"), facts.refusal.reason
    if facts.crashed:
        return "upstream_error", "internal_error"
    if facts.interrupted:
        return "interrupted", facts.error_type
    if facts.disconnected:
        return "client_disconnected", facts.error_type
    if facts.cut is not None:
        return "upstream_unreachable", facts.cut.reason
    if facts.status >= 400 or facts.error_type is not None:
        return "upstream_error", facts.error_type
    if not facts.complete:
        return "upstream_error", "incomplete_stream"
    return "ok", None


class Call:
    """What one request has told us so far; becomes a `UsageRecord` when it ends."""

    __slots__ = (
        "agent",
        "batch_id",
        "custom_id",
        "endpoint",
        "estimate",
        "facts",
        "first_byte",
        "forwarded",
        "id",
        "key",
        "max_tokens",
        "max_tokens_sent",
        "model",
        "parent_agent",
        "priced",
        "fingerprint",
        "hold",
        "response_model",
        "retry_count",
        "sent",
        "session",
        "started",
        "ticket",
        "started_at",
        "status",
        "streamed",
        "feature",
        "upstream_done",
        "upstream_request_id",
        "usage",
        "user",
        "metered",
    )

    def __init__(self, endpoint: str, *, call_id: str | None = None, started_at: datetime | None = None) -> None:
        self.id = call_id or new_call_id()
        self.endpoint = endpoint
        self.started_at = started_at or datetime.now(UTC)
        self.started = time.perf_counter() if started_at is None else None
        self.first_byte: float | None = None
        # When the request went upstream, and when the upstream's part was last done (its headers, then its
        # whole body): `perf_counter` readings, for the time spendgate adds.
        self.sent: float | None = None
        self.upstream_done: float | None = None
        self.facts = Facts()
        self.key: KeyInfo | None = None
        self.feature: str | None = None
        self.user: str | None = None
        self.session: str | None = None
        self.agent: str | None = None
        self.parent_agent: str | None = None
        self.model: str | None = None
        self.response_model: str | None = None
        self.upstream_request_id: str | None = None
        self.status = 0  # what the client was answered
        self.streamed = False
        self.usage: Usage | None = None
        self.retry_count = 0
        self.max_tokens: int | None = None
        self.max_tokens_sent: int | None = None
        self.hold: Hold | None = None
        self.ticket: Ticket | None = None  # what the call took from its rate limits
        self.priced: Cost | None = None
        self.fingerprint: str | None = None  # of a Messages request, for retry linking
        # The Messages call's worst-case cost (computed at most once): what it is charged if it went out and no
        # usage came back.
        self.estimate: Callable[[], Decimal | None] | None = None
        self.batch_id: str | None = None
        self.custom_id: str | None = None
        self.forwarded = False
        # Whether its usage is priced (Messages, batch results) or it is unmetered (cost null): token counting
        # and calls that never went out cost zero.
        self.metered = False

    def refuse(self, error: ProxyError) -> None:
        """Note that the proxy answered this call with an error of its own."""
        self.facts.refusal = error
        self.status = error.status

    def take(self, summary: MessageSummary, *, stream: bool) -> None:
        """Take in what the response said: usage, the serving model, an error type, whether a stream ended."""
        if summary.usage is not None:
            self.usage = summary.usage
        if summary.response_model is not None:
            self.response_model = label(summary.response_model, 200)
        if summary.error_type is not None:
            self.facts.error_type = label(summary.error_type, 100)
        if stream and self.facts.status < 300:
            self.facts.complete = summary.complete

    def may_have_been_billed(self) -> bool:
        """Whether a Messages call went out and was not answered with an error: cut off (by the client, the upstream
        or the shutdown) before its usage arrived, Anthropic may still bill it."""
        return (
            self.forwarded
            and self.estimate is not None
            and self.facts.refusal is None
            and self.facts.status < 400
            and self.facts.error_type is None
        )

    def upstream_seconds(self) -> float:
        """How long the call has waited on the upstream so far."""
        if self.sent is None or self.upstream_done is None:
            return 0.0
        return self.upstream_done - self.sent

    def overhead_ms(self) -> str:
        """The `x-spendgate-overhead-ms` value as an answer starts: time since arrival not spent on the upstream."""
        if self.started is None:
            return "0"
        return format((time.perf_counter() - self.started - self.upstream_seconds()) * 1000, ".3f")

    def cost(self, prices: PriceTable) -> Cost:
        """The call's price by the table in force when it started; computed once, when its usage is final."""
        if self.priced is None:
            version = prices.version_at(self.started_at)
            if self.forwarded and not self.metered and self.endpoint != COUNT_TOKENS:
                self.priced = Cost(cost_usd=None, price_version=version, price_source="unmetered")
            elif self.usage is None and self.may_have_been_billed():
                self.priced = Cost(
                    cost_usd=self.estimate() if self.estimate is not None else None,
                    price_version=version,
                    price_source="table",
                    cost_source="estimate",
                )
            elif self.usage is None or not self.forwarded or self.endpoint == COUNT_TOKENS:
                # Never sent, free (token counting), or no usage reported: nothing we can see was consumed.
                self.priced = Cost(cost_usd=ZERO, price_version=version, price_source="table")
            else:
                model = self.response_model or self.model or ""
                self.priced = prices.price(model=model, usage=self.usage, at=self.started_at)
        return self.priced


def make_record(call: Call, prices: PriceTable) -> UsageRecord:
    """The ledger record of a call, live or a batch result."""
    cost = call.cost(prices)
    outcome, error_type = decide_outcome(call.facts)
    finished_at = datetime.now(UTC)
    upstream_ms: float | None = None
    if call.started is not None:
        latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
        ttfb_ms = None if call.first_byte is None else round((call.first_byte - call.started) * 1000, 3)
        upstream_ms = round(call.upstream_seconds() * 1000, 3)
    else:
        latency_ms, ttfb_ms = round((finished_at - call.started_at).total_seconds() * 1000, 3), None
    key = call.key
    return UsageRecord(
        id=call.id,
        started_at=call.started_at,
        finished_at=finished_at,
        team=key.team if key else None,
        key_id=key.key_id if key else None,
        feature=call.feature,
        user=call.user,
        session=call.session,
        agent=call.agent,
        parent_agent=call.parent_agent,
        endpoint=call.endpoint,
        model=call.model,
        response_model=call.response_model,
        upstream_request_id=call.upstream_request_id,
        status=call.status,
        outcome=outcome,
        error_type=error_type,
        streamed=call.streamed,
        usage=call.usage or Usage(),
        cost_usd=cost.cost_usd,
        price_version=cost.price_version,
        price_source=cost.price_source,
        cost_source=cost.cost_source,
        is_retry=call.retry_count > 0,
        retry_reason="sdk" if call.retry_count > 0 else None,
        retry_count=call.retry_count,
        batch_id=call.batch_id,
        custom_id=call.custom_id,
        max_tokens_requested=call.max_tokens,
        max_tokens_sent=call.max_tokens_sent,
        latency_ms=latency_ms,
        ttfb_ms=ttfb_ms,
        upstream_ms=upstream_ms,
        hold=call.hold,
        fingerprint=call.fingerprint,
        retry_window_seconds=key.retry_window_seconds if key else 0,
    )


def describe(call: Call, headers: dict[bytes, bytes]) -> None:
    """Take what the request's headers say about the call: feature, user, session and agents, SDK retry count.

    A client's own `x-spendgate-session` names the session over Claude Code's id (a wrapper may group several
    Claude Code sessions as one); spendgate's headers are not forwarded, Claude Code's are."""
    call.feature = _header_label(headers.get(b"x-spendgate-feature"), 200)
    call.user = _header_label(headers.get(b"x-spendgate-user"), 256)
    call.session = _header_label(
        headers.get(b"x-spendgate-session") or headers.get(b"x-claude-code-session-id"), ID_LIMIT
    )
    call.agent = _header_label(headers.get(b"x-claude-code-agent-id"), ID_LIMIT)
    call.parent_agent = _header_label(headers.get(b"x-claude-code-parent-agent-id"), ID_LIMIT)
    retry_count = headers.get(b"x-stainless-retry-count", b"0")
    # Thousands of digits would cost a quadratic int() (and raise past 4,300): past ten digits it is just "many".
    if retry_count.isdigit():
        call.retry_count = min(int(retry_count[:10]), MAX_COUNT)


def _header_label(value: bytes | None, limit: int) -> str | None:
    """A header's value as a label; None when absent or empty."""
    return label(value.decode("utf-8", "replace"), limit) if value else None


def label(value: str, limit: int) -> str:
    """A client- or upstream-supplied string made safe for a ledger column: valid UTF-8 (lone surrogates
    replaced), no NUL (PostgreSQL refuses it), and no longer than the column."""
    value = value[:limit]
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "")
