"""Errors the proxy itself answers with, rendered in Anthropic's error shape so the SDKs raise their usual exceptions.

ProxyError
├── InvalidKey            401 authentication_error  invalid_key
├── ModelNotAllowed       403 permission_error      model_not_allowed
├── ModelNotFound         404 not_found_error       model_not_allowed
├── OutputCapExceeded     400 invalid_request_error output_cap
├── BudgetExceeded        402 billing_error         budget_exceeded
├── RateLimited           429 rate_limit_error      rate_limited
├── BadRequest            400 invalid_request_error bad_request
├── NonCanonicalPath      400 invalid_request_error non_canonical_path
├── RouteNotFound         404 not_found_error       not_found
├── MethodNotAllowed      405 invalid_request_error method_not_allowed
├── BodyTimeout           408 timeout_error         body_timeout
├── UnpricedModel         400 invalid_request_error unpriced_model
├── BatchNotFound         404 not_found_error       batch_not_found
├── RequestTooLarge       413 request_too_large     request_too_large
├── LedgerUnavailable     503 api_error             ledger_unavailable
├── Overloaded            529 overloaded_error      large_body_busy
├── UpstreamUnreachable   502 api_error             upstream_unreachable
└── UpstreamTimeout       504 api_error             upstream_timeout
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import ClassVar

from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.responses import JSONResponse, Response


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    """An answer in Anthropic's error shape, for surfaces that refuse without a `ProxyError` (admin, metrics)."""
    return JSONResponse({"type": "error", "error": {"type": error_type, "message": message}}, status_code=status)


class ProxyError(Exception):
    """Base class: each subclass is one row of the spec's error table."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    reason: ClassVar[str] = "internal_error"
    # None: let the SDK apply its own policy (it retries 5xx); False: `x-should-retry: false`.
    should_retry: ClassVar[bool | None] = None

    def __init__(self, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.extra_headers = headers

    def body(self) -> bytes:
        """The JSON body, shaped like Anthropic's own errors."""
        return json.dumps({"type": "error", "error": {"type": self.error_type, "message": self.message}}).encode()

    def response(self) -> Response:
        """The whole answer, for code that answers through Starlette (the admin API, the router)."""
        headers = {name.decode(): value.decode() for name, value in self.headers()}
        return Response(self.body(), status_code=self.status, headers=headers)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers for this error, including `x-spendgate-error`."""
        headers = [
            (b"content-type", b"application/json"),
            (b"x-spendgate-error", self.reason.encode()),
        ]
        if self.should_retry is False:
            headers.append((b"x-should-retry", b"false"))
        headers.extend(self.extra_headers)
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


class ModelNotFound(ProxyError):
    """`GET /v1/models/{model_id}` for a model the team may not use: as absent as it is from the team's list."""

    status = 404
    error_type = "not_found_error"
    reason = "model_not_allowed"
    should_retry = False


class OutputCapExceeded(ProxyError):
    """`max_tokens` is above the team's cap and the cap policy is `reject`."""

    status = 400
    error_type = "invalid_request_error"
    reason = "output_cap"
    should_retry = False


class BudgetExceeded(ProxyError):
    """The call could exceed the team's or key's remaining budget. `left` is what the tightest window had left
    (None when unknown): what a team clamping at the budget edge may still spend on it."""

    status = 402
    error_type = "billing_error"
    reason = "budget_exceeded"
    should_retry = False

    def __init__(
        self, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = (), left: Decimal | None = None
    ) -> None:
        super().__init__(message, headers=headers)
        self.left = left


class RateLimited(ProxyError):
    """The call would exceed a team's or key's requests or tokens per minute.

    With `retry_after`, a `retry-after` header says when the bucket will have refilled enough (the SDKs wait that
    long, up to 60 s, and retry); `retry=False` for a call too large for the limit ever to admit.
    """

    status = 429
    error_type = "rate_limit_error"
    reason = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int | None = None,
        retry: bool = True,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        extra = [*headers]
        if retry_after is not None:
            extra.append((b"retry-after", str(retry_after).encode()))
        if not retry:
            extra.append((b"x-should-retry", b"false"))
        super().__init__(message, headers=tuple(extra))
        self.retry_after = retry_after


class BadRequest(ProxyError):
    """The body is not valid JSON or not a Messages request."""

    status = 400
    error_type = "invalid_request_error"
    reason = "bad_request"
    should_retry = False


class NonCanonicalPath(ProxyError):
    """The request target is not spelled the one way Anthropic spells its paths (dot segments, escapes, …)."""

    status = 400
    error_type = "invalid_request_error"
    reason = "non_canonical_path"
    should_retry = False


class RouteNotFound(ProxyError):
    """No such route: an unknown Messages path, or `/v1/v1/…` from a `base_url` ending in `/v1`."""

    status = 404
    error_type = "not_found_error"
    reason = "not_found"
    should_retry = False


class MethodNotAllowed(ProxyError):
    """The route exists but not for this method; `allow` lists the ones it takes."""

    status = 405
    error_type = "invalid_request_error"
    reason = "method_not_allowed"
    should_retry = False


class BodyTimeout(ProxyError):
    """The request body did not arrive within SPENDGATE_BODY_TIMEOUT_SECONDS."""

    status = 408
    error_type = "timeout_error"
    reason = "body_timeout"
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


class Overloaded(ProxyError):
    """Another request's large body is being taken in: its turn did not come while this one waited."""

    status = 529
    error_type = "overloaded_error"
    reason = "large_body_busy"


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


@contextlib.contextmanager
def ledger_errors(what: str = "The spend ledger did not answer.") -> Iterator[None]:
    """The one mapping of database failures to API answers, for the gateway and the admin API alike: a value the
    database refuses is the request's fault (`BadRequest`); any other failure is `LedgerUnavailable` (503)."""
    try:
        yield
    except DataError as exc:
        raise BadRequest(f"The ledger refused a value of this request: {str(exc.orig)[:200]}") from exc
    except SQLAlchemyError as exc:
        raise LedgerUnavailable(f"{what} Try again shortly.") from exc
