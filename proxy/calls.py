"""One call in flight: what its request and response have told us, and the usage record it becomes."""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.batches import BatchOwner, BatchRoute
from proxy.errors import BadRequest, ProxyError
from proxy.keys import KeyInfo
from proxy.pricing import PriceTable
from proxy.retries import fingerprint
from proxy.types import Cost, Outcome, Reservation, Usage, UsageRecord
from proxy.usage import MessageSummary

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
ZERO = Decimal(0)
# Request bodies up to this size travel with their record to the ledger writer (see `Call._retry_fields`).
MAX_CARRIED_BODY = 64 * 1024
# The largest count an INTEGER column holds; larger client-sent numbers are not stored as counts.
MAX_COUNT = 2**31 - 1


class Call:
    """What one request has told us so far; becomes a `UsageRecord` when it ends."""

    __slots__ = (
        "id",
        "endpoint",
        "started_at",
        "started",
        "first_byte",
        "team",
        "key_id",
        "feature",
        "user",
        "model",
        "response_model",
        "upstream_request_id",
        "status",
        "outcome",
        "error_type",
        "streamed",
        "usage",
        "retry_count",
        "max_tokens",
        "max_tokens_sent",
        "reservation",
        "priced",
        "request_body",
        "retry_window",
        "key",
        "batch_route",
        "batch",
        "public_url",
        "finished",
        "disconnected",
    )

    def __init__(self, endpoint: str | None) -> None:
        self.id = "sgr_" + secrets.token_hex(12)
        self.endpoint = endpoint
        self.started_at = datetime.now(UTC)
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.team: str | None = None
        self.key_id: str | None = None
        self.feature: str | None = None
        self.user: str | None = None
        self.model: str | None = None
        self.response_model: str | None = None
        self.upstream_request_id: str | None = None
        self.status = 0
        self.outcome: Outcome = "ok"
        self.error_type: str | None = None
        self.streamed = False
        self.usage: Usage | None = None
        self.retry_count = 0
        self.max_tokens: int | None = None
        self.max_tokens_sent: int | None = None
        self.reservation: Reservation | None = None
        self.priced: Cost | None = None
        self.request_body: bytes | None = None
        self.retry_window = 0
        self.key: KeyInfo | None = None
        self.batch_route: BatchRoute | None = None
        self.batch: BatchOwner | None = None
        self.public_url = ""
        self.finished = False
        self.disconnected = False

    def fail(self, error: ProxyError, outcome: Outcome) -> None:
        """Note a failure raised by the proxy itself."""
        self.status = error.status
        self.outcome = outcome
        self.error_type = error.reason

    def cost(self, prices: PriceTable) -> Cost:
        """The call's price by the table in force when it started; computed once, when its usage is final."""
        if self.priced is None:
            if self.endpoint == COUNT_TOKENS or self.usage is None:
                # Token counting is free; a call that never reported usage consumed nothing we can see.
                self.priced = Cost(
                    cost_usd=ZERO, price_version=prices.version_at(self.started_at), price_source="table"
                )
            else:
                model = self.response_model or self.model or ""
                self.priced = prices.price(model=model, usage=self.usage, at=self.started_at)
        return self.priced

    def to_record(self, prices: PriceTable) -> UsageRecord:
        """The ledger record of this call."""
        cost = self.cost(prices)
        now = time.perf_counter()
        return UsageRecord(
            id=self.id,
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            team=self.team,
            key_id=self.key_id,
            feature=self.feature,
            user=self.user,
            endpoint=self.endpoint or "",
            model=self.model,
            response_model=self.response_model,
            upstream_request_id=self.upstream_request_id,
            status=self.status,
            outcome=self.outcome,
            error_type=self.error_type,
            streamed=self.streamed,
            usage=self.usage or Usage(),
            cost_usd=cost.cost_usd,
            price_version=cost.price_version,
            price_source=cost.price_source,
            is_retry=self.retry_count > 0,
            retry_reason="sdk" if self.retry_count > 0 else None,
            retry_count=self.retry_count,
            max_tokens_requested=self.max_tokens,
            max_tokens_sent=self.max_tokens_sent,
            latency_ms=round((now - self.started) * 1000, 3),
            ttfb_ms=None if self.first_byte is None else round((self.first_byte - self.started) * 1000, 3),
            reservation=self.reservation,
            **self._retry_fields(),
            retry_window_seconds=self.retry_window,
        )

    def _retry_fields(self) -> dict[str, Any]:
        # A small body rides along to the ledger writer, which fingerprints it off the response path; a large
        # one is fingerprinted now, so a queue of records waiting on a slow ledger never holds megabytes each.
        if self.endpoint != MESSAGES or self.request_body is None:
            return {}
        if len(self.request_body) <= MAX_CARRIED_BODY:
            return {"request_body": self.request_body}
        return {"fingerprint": fingerprint(self.request_body)}


def describe_call(call: Call, headers: dict[bytes, bytes], body: bytes) -> dict[str, Any] | None:
    """Fill in what the request says about itself: feature, user, model, max_tokens, retry count.

    Returns the parsed Messages request for metered calls (None for other paths).
    """
    feature = headers.get(b"x-spendgate-feature")
    call.feature = label(feature.decode("utf-8", "replace"), 200) if feature else None
    user = headers.get(b"x-spendgate-user")
    call.user = label(user.decode("utf-8", "replace"), 256) if user else None
    retry_count = headers.get(b"x-stainless-retry-count", b"0")
    call.retry_count = min(int(retry_count), MAX_COUNT) if retry_count.isdigit() else 0
    if call.endpoint is None:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        raise BadRequest("The request body is not valid JSON. Send a Messages API request as a JSON object.") from None
    if not isinstance(request, dict):
        raise BadRequest("The request body must be a JSON object (a Messages API request).")
    model = request.get("model")
    call.model = label(model, 200) if isinstance(model, str) else None
    # A streaming request: a client leaving before the answer starts must cut the generation too.
    call.streamed = request.get("stream") is True
    max_tokens = request.get("max_tokens")
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 <= max_tokens <= MAX_COUNT
    call.max_tokens = max_tokens if valid else None
    call.max_tokens_sent = call.max_tokens
    if call.user is None:
        metadata = request.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        call.user = label(user_id, 256) if isinstance(user_id, str) else None
    return request


def label(value: str, limit: int) -> str:
    """A client- or upstream-supplied string made safe for a ledger column: no NUL (PostgreSQL refuses it), and
    no longer than the column."""
    return value.replace("\x00", "")[:limit]


def note_summary(call: Call, summary: MessageSummary) -> None:
    """Take in what the response said: usage, the serving model, an error type."""
    if summary.usage is not None:
        call.usage = summary.usage
    if summary.response_model is not None:
        call.response_model = label(summary.response_model, 200)
    if summary.error_type is not None:
        call.error_type = label(summary.error_type, 100)
        if call.outcome == "ok":
            # An `event: error` inside a 200 stream: the call failed upstream after it started.
            call.outcome = "upstream_error"
