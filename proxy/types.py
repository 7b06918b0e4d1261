"""The vocabulary shared across modules: closed sets from the spec and the records that cross module boundaries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, Final, Literal

Outcome = Literal["ok", "upstream_error", "rejected", "client_disconnected", "upstream_unreachable", "interrupted"]
RetryReason = Literal["sdk", "repeat"]
CapPolicy = Literal["clamp", "reject"]
Period = Literal["day", "week", "month", "total"]
# How a call's price was found: an exact table entry, a family fallback for an unlisted model, no price at all
# for a model that should have one, or a route spendgate forwards without metering (cost null by design).
PriceSource = Literal["table", "family", "unpriced", "unmetered"]

CostSource = Literal["estimate"]

# What reports can be grouped by.
GROUPS = ("team", "model", "feature", "user", "session", "agent", "key", "day")
PERIODS: tuple[Period, ...] = ("day", "week", "month", "total")
# The endpoints spendgate meters, as a record's `endpoint` names them (a batch's own paths start with BATCHES).
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
BATCHES = "/v1/messages/batches"
CAP_POLICIES: tuple[CapPolicy, ...] = ("clamp", "reject")
# What a team does with a call whose worst case is more than a budget window has left: refuse it, or lower its
# `max_tokens` to what the tightest window can pay.
BudgetEdge = Literal["refuse", "clamp"]
BUDGET_EDGES: tuple[BudgetEdge, ...] = ("refuse", "clamp")
# A budget's allowance per window (only the windows that have one), in `PERIODS` order.
Windows = dict[Period, Decimal]


class Unset:
    """The type of `UNSET`: an option that was not given, as opposed to one given as None ("no limit")."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()

# Field metadata of `Usage` and `UsageRecord` saying where a field goes beyond the process. A field without any is
# a ledger column that exports and the admin API show.
_NOT_A_COLUMN = {"column": False}  # the process's alone: never stored, never shown
_NOT_PUBLIC = {"public": False}  # stored for spendgate's own use, not shown


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationUsage:
    """One entry of the beta `usage.iterations` list (compaction, advisor, fallback, message)."""

    type: str
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts and billing modifiers of one response, as Anthropic reported them.

    `input_tokens` is the uncached remainder only; cache writes and reads are separate counts, never
    included in it (https://docs.claude.com/en/docs/build-with-claude/prompt-caching).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    service_tier: str | None = None
    speed: str | None = None
    inference_geo: str | None = None
    iterations: tuple[IterationUsage, ...] = field(default=(), metadata=_NOT_A_COLUMN)


# Token kinds as metrics and reconciliation name them (Anthropic's report vocabulary), and the `Usage` field (and
# ledger column) of each.
TOKEN_KIND_FIELDS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_write_5m": "cache_creation_5m_input_tokens",
    "cache_write_1h": "cache_creation_1h_input_tokens",
    "cache_read": "cache_read_input_tokens",
}

# The token counts and modifiers of `Usage` that are ledger columns.
USAGE_COLUMNS = tuple(item.name for item in fields(Usage) if item.metadata.get("column", True))


def usd(value: Decimal | None) -> str | None:
    """Money as JSON carries it: the exact decimal digits as a string (never exponent notation), or None."""
    return None if value is None else format(value, "f")


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date or time from a user; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-01 or 2026-11-01T12:00:00Z)"
        ) from None
    if not value.tzinfo:
        return value.replace(tzinfo=UTC)
    try:
        # An instant at the edge of the calendar with an offset has no UTC time (9999-12-31T23:59-01:00).
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """The price of one call. `cost_usd` is None only when no price exists for the model (`unpriced`)."""

    cost_usd: Decimal | None
    price_version: str
    price_source: PriceSource
    cost_source: CostSource | None = None  # `estimate`: usage unknown, the worst case charged


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """A team's or key's rate limits: requests, input tokens and output tokens per minute (None: no limit)."""

    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None


NO_RATE_LIMITS = RateLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class Counter:
    """One budget a call counts against: a team's or a key's spend in one calendar period."""

    scope: str  # "team:<id>:<period>", "key:<id>:<period>" or "user:<team id>:<digest>:<period>"
    label: str  # how errors and alerts name it, e.g. "team research"
    period: Period
    period_start: datetime
    budget_usd: Decimal | None


@dataclass(frozen=True, slots=True, kw_only=True)
class HoldOwner:
    """Whose call a budget hold is: the serving process, and what the call's record needs if that process dies."""

    instance_id: str
    team: str
    key_id: str
    endpoint: str
    model: str | None
    user: str | None = None
    feature: str | None = None
    session: str | None = None
    agent: str | None = None
    parent_agent: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """What a call holds against its budgets while it runs; settled to the actual cost when it is recorded."""

    call_id: str
    counters: tuple[Counter, ...]
    amount: Decimal  # the worst-case estimate held on every counter that has a budget
    held: bool  # whether the call has a hold of its own in the ledger (only when some counter has a budget)
    # The budget lease of this process the call was admitted under instead (`proxy/gateway/leases/budget.py`): its cost
    # is taken from the lease when the record is written.
    lease: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRecord:
    """One metered call, exactly as it is written to the ledger (fields per the spec's usage-record table).

    The one list of a record's fields: the ledger row, spill files, exports and the admin API follow these fields
    in this order (`ROW_COLUMNS`, `usage` flattened in place), as their metadata says. The audit hash and the crash
    journal's line keep lists of their own, frozen on purpose (`proxy/ledger/audit.py`, `proxy/ledger/journal.py`).
    """

    id: str
    started_at: datetime
    finished_at: datetime
    team: str | None
    key_id: str | None
    feature: str | None
    user: str | None
    # The agent session the call is part of, the agent (a Claude Code subagent) that made it and the agent that
    # started that one: Claude Code's `x-claude-code-*` ids, or `x-spendgate-session` (`proxy/gateway/call.py`).
    session: str | None = None
    agent: str | None = None
    parent_agent: str | None = None
    endpoint: str
    model: str | None
    response_model: str | None
    upstream_request_id: str | None
    status: int
    outcome: Outcome
    error_type: str | None
    streamed: bool
    batch_id: str | None = None
    custom_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal | None
    price_version: str
    price_source: PriceSource
    # "estimate" when the cost is a worst case rather than priced usage (a call whose process died); else None.
    cost_source: CostSource | None = None
    is_retry: bool = False
    retry_reason: RetryReason | None = None
    retry_of: str | None = None
    retry_count: int = 0
    # SHA-256 of the request's canonical JSON, how the writer finds earlier attempts of a call: not one of the
    # spec's usage-record fields, so exports and the admin API leave it out.
    fingerprint: str | None = field(default=None, metadata=_NOT_PUBLIC)
    attempt: int = 0
    max_tokens_requested: int | None = None
    max_tokens_sent: int | None = None
    latency_ms: float
    ttfb_ms: float | None
    # Of `latency_ms`, the time spent waiting on the upstream (0 for a call never sent; None for a batch result,
    # which has no timings of its own), for metrics and logs.
    upstream_ms: float | None = field(default=None, metadata=_NOT_A_COLUMN)
    # What the ledger writer settles in the same transaction that inserts the record, and the team's repeat window
    # it links retries within.
    hold: Hold | None = field(default=None, metadata=_NOT_A_COLUMN)
    retry_window_seconds: int = field(default=0, metadata=_NOT_A_COLUMN)


def _columns(*, public: bool) -> tuple[str, ...]:
    names: list[str] = []
    for item in fields(UsageRecord):
        if item.metadata.get("column", True) and (not public or item.metadata.get("public", True)):
            names += USAGE_COLUMNS if item.name == "usage" else (item.name,)
    return tuple(names)


# A record's ledger columns, in its fields' order with its usage flattened in place.
ROW_COLUMNS = _columns(public=False)
# The columns exports and the admin API show, in the same order.
PUBLIC_COLUMNS = _columns(public=True)


def column_getter(columns: Iterable[str]) -> Callable[[UsageRecord], tuple[Any, ...]]:
    """A function giving a record's values of these ledger columns, in their order (token counts from its `usage`).

    One `attrgetter`: a single C call per record, on the writer's and the journal's paths."""
    return attrgetter(*(f"usage.{name}" if name in USAGE_COLUMNS else name for name in columns))
