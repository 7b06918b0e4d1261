"""Errors the proxy itself answers with, rendered in Anthropic's error shape so the SDKs raise their usual exceptions.

ProxyError
├── InvalidKey            401 authentication_error  invalid_key
├── ModelNotAllowed       403 permission_error      model_not_allowed
├── OutputCapExceeded     400 invalid_request_error output_cap
├── BudgetExceeded        402 billing_error         budget_exceeded
├── BadRequest            400 invalid_request_error bad_request
├── UnpricedModel         400 invalid_request_error unpriced_model
├── BatchNotFound         404 not_found_error       batch_not_found
├── RequestTooLarge       413 request_too_large     request_too_large
├── LedgerUnavailable     503 api_error             ledger_unavailable
├── UpstreamUnreachable   502 api_error             upstream_unreachable
└── UpstreamTimeout       504 api_error             upstream_timeout
"""

from __future__ import annotations

import json
from typing import ClassVar


class ProxyError(Exception):
    """Base class: each subclass is one row of the spec's error table."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    reason: ClassVar[str] = "internal_error"
    # None: let the SDK apply its own policy (it retries 5xx); False: `x-should-retry: false`.
    should_retry: ClassVar[bool | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        """The JSON body, shaped like Anthropic's own errors."""
        return json.dumps({"type": "error", "error": {"type": self.error_type, "message": self.message}}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers for this error, including `x-spendgate-error`."""
        headers = [
            (b"content-type", b"application/json"),
            (b"x-spendgate-error", self.reason.encode()),
        ]
        if self.should_retry is False:
            headers.append((b"x-should-retry", b"false"))
        return headers


class InvalidKey(ProxyError):
    """The spendgate key is missing, unknown or revoked."""

    status = 401
    error_type = "authentication_error"
    reason = "invalid_key"
    should_retry = False


class ModelNotAllowed(ProxyError):
    """The team may not use the requested model."""

    status = 403
    error_type = "permission_error"
    reason = "model_not_allowed"
    should_retry = False


class OutputCapExceeded(ProxyError):
    """`max_tokens` is above the team's cap and the cap policy is `reject`."""

    status = 400
    error_type = "invalid_request_error"
    reason = "output_cap"
    should_retry = False


class BudgetExceeded(ProxyError):
    """The call could exceed the team's or key's remaining budget."""

    status = 402
    error_type = "billing_error"
    reason = "budget_exceeded"
    should_retry = False


class BadRequest(ProxyError):
    """The body is not valid JSON or not a Messages request."""

    status = 400
    error_type = "invalid_request_error"
    reason = "bad_request"
    should_retry = False


class BatchNotFound(ProxyError):
    """The batch does not exist, or belongs to another team (which must not learn that it exists)."""

    status = 404
    error_type = "not_found_error"
    reason = "batch_not_found"
    should_retry = False


class UnpricedModel(ProxyError):
    """The team has a budget and the model has no price, so the call's cost cannot be bounded."""

    status = 400
    error_type = "invalid_request_error"
    reason = "unpriced_model"
    should_retry = False


class LedgerUnavailable(ProxyError):
    """The budget could not be checked because the database did not answer (fail closed)."""

    status = 503
    error_type = "api_error"
    reason = "ledger_unavailable"


class RequestTooLarge(ProxyError):
    """The body is over the configured limit (the API's own 32 MB by default)."""

    status = 413
    error_type = "request_too_large"
    reason = "request_too_large"
    should_retry = False


class UpstreamUnreachable(ProxyError):
    """The upstream refused the connection or dropped it."""

    status = 502
    error_type = "api_error"
    reason = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream did not answer in time."""

    status = 504
    error_type = "api_error"
    reason = "upstream_timeout"
