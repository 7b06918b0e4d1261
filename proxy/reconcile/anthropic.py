"""Anthropic's own usage and cost figures, read through its Admin API.

The Usage and Cost Analytics API (beta) first; the legacy Usage and Cost API when the analytics endpoints are
not there (404). Both are normalised to `Reported` rows: one per (bucket, model, service tier), tokens of each
kind, and, for cost rows, USD. Every answer is validated before use; pages are followed, 429s waited out (their
`retry-after`), 5xx and network errors retried with backoff. Money arrives as text in cents and stays exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, NonNegativeInt, ValidationError

from proxy.types import TOKEN_KIND_FIELDS

ANTHROPIC_VERSION = "2023-06-01"
ANALYTICS_BETA = "analytics-usage-cost-2026-08-24"
# The analytics API serves at most 31 days per request.
MAX_RANGE = timedelta(days=31)
ATTEMPTS = 6
# A period of 31 days in hourly buckets, per model and tier, at 1,000 rows a page, is far below this.
MAX_PAGES = 1000
MAX_WAIT_SECONDS = 60.0
# Compared per bucket: the token kinds, and web searches (billed per search).
TOKEN_KINDS = (*TOKEN_KIND_FIELDS, "web_search_requests")
Width = Literal["hour", "day"]
WIDTHS = {"hour": ("1h", timedelta(hours=1)), "day": ("1d", timedelta(days=1))}
# Legacy `limit` caps (buckets per page) per width.
LEGACY_LIMITS = {"1h": 168, "1d": 31}


Parsed = TypeVar("Parsed", bound=BaseModel)


class ReportError(RuntimeError):
    """The Admin API refused, failed, or answered something we cannot read; the message says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reported:
    """Anthropic's figures for one model and service tier in one time bucket."""

    start: datetime
    model: str  # as reported; "" for costs tied to no model (web search in the legacy cost report)
    service_tier: str
    tokens: dict[str, int] = field(default_factory=dict)
    cost_usd: Decimal | None = None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _CacheCreation(_Loose):
    ephemeral_5m_input_tokens: NonNegativeInt = 0
    ephemeral_1h_input_tokens: NonNegativeInt = 0


class _ServerTools(_Loose):
    web_search_requests: NonNegativeInt = 0


class _Tokens(_Loose):
    uncached_input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    cache_read_input_tokens: NonNegativeInt = 0
    cache_creation: _CacheCreation = _CacheCreation()
    server_tool_use: _ServerTools = _ServerTools()

    def counts(self) -> dict[str, int]:
        return {
            "input": self.uncached_input_tokens,
            "output": self.output_tokens,
            "cache_write_5m": self.cache_creation.ephemeral_5m_input_tokens,
            "cache_write_1h": self.cache_creation.ephemeral_1h_input_tokens,
            "cache_read": self.cache_read_input_tokens,
            "web_search_requests": self.server_tool_use.web_search_requests,
        }


class _Group(_Loose):
    model: str | None = None
    service_tier: str | None = None


class _Cost(_Loose):
    amount: Decimal  # cents, as text
    currency: str = "USD"


class _UsageRow(_Loose):
    starting_at: AwareDatetime
    group: _Group
    usage: _Tokens


class _CostRow(_Loose):
    starting_at: AwareDatetime
    group: _Group
    cost: _Cost


class _Page(_Loose):
    data: list[dict[str, Any]]
    has_more: bool | None = None
    next_page: str | None = None


class _LegacyResult(_Tokens, _Group):
    amount: Decimal | None = None  # cost rows: cents, as text
    currency: str = "USD"


class _LegacyBucket(_Loose):
    starting_at: AwareDatetime
    results: list[_LegacyResult]


@dataclass
class AdminClient:
    """Reads Anthropic's usage and cost reports with an Admin API key."""

    admin_key: str
    base_url: str = "https://api.anthropic.com"
    api_key_id: str | None = None  # the upstream key's `apikey_…` id: only its traffic is compared
    sleep: Callable[[float], None] = time.sleep
    transport: httpx.BaseTransport | None = None

    def usage(self, since: datetime, until: datetime, width: Width) -> list[Reported]:
        """Tokens per bucket, model and service tier."""
        try:
            return list(self._analytics("usage", since, until, width))
        except _Missing:
            return list(self._legacy_usage(since, until, width))

    def cost(self, since: datetime, until: datetime) -> list[Reported]:
        """USD per day, model and service tier."""
        try:
            return list(self._analytics("cost", since, until, "day"))
        except _Missing:
            return list(self._legacy_cost(since, until))

    def _analytics(self, kind: str, since: datetime, until: datetime, width: Width) -> Iterator[Reported]:
        code, _ = WIDTHS[width]
        for start, end in _windows(since, until):
            params: dict[str, Any] = {
                "starting_at": _rfc3339(start),
                "ending_at": _rfc3339(end),
                "time_bucket_width": code,
                "group_by[]": ["model", "service_tier"],
                "limit": 1000,
            }
            if self.api_key_id:
                params["api_key_ids[]"] = [self.api_key_id]
            for row in self._pages(f"/v1/organizations/analytics/{kind}", params, beta=True):
                if kind == "usage":
                    usage = _parse(_UsageRow, row)
                    yield Reported(
                        start=usage.starting_at,
                        model=usage.group.model or "",
                        service_tier=usage.group.service_tier or "standard",
                        tokens=usage.usage.counts(),
                    )
                else:
                    cost = _parse(_CostRow, row)
                    _check_currency(cost.cost.currency)
                    yield Reported(
                        start=cost.starting_at,
                        model=cost.group.model or "",
                        service_tier=cost.group.service_tier or "standard",
                        cost_usd=cost.cost.amount / 100,
                    )

    def _legacy_usage(self, since: datetime, until: datetime, width: Width) -> Iterator[Reported]:
        code, _ = WIDTHS[width]
        params: dict[str, Any] = {
            "starting_at": _rfc3339(since),
            "ending_at": _rfc3339(until),
            "bucket_width": code,
            "group_by[]": ["model", "service_tier"],
            "limit": LEGACY_LIMITS[code],
        }
        if self.api_key_id:
            params["api_key_ids[]"] = [self.api_key_id]
        for raw in self._pages("/v1/organizations/usage_report/messages", params, beta=False):
            bucket = _parse(_LegacyBucket, raw)
            for result in bucket.results:
                yield Reported(
                    start=bucket.starting_at,
                    model=result.model or "",
                    service_tier=result.service_tier or "standard",
                    tokens=result.counts(),
                )

    def _legacy_cost(self, since: datetime, until: datetime) -> Iterator[Reported]:
        # Grouped by description: the only way the legacy cost report names models (web search rows name none).
        params = {"starting_at": _rfc3339(since), "ending_at": _rfc3339(until), "group_by[]": ["description"]}
        for raw in self._pages("/v1/organizations/cost_report", {**params, "limit": 31}, beta=False):
            bucket = _parse(_LegacyBucket, raw)
            for result in bucket.results:
                _check_currency(result.currency)
                yield Reported(
                    start=bucket.starting_at,
                    model=result.model or "",
                    service_tier=result.service_tier or "standard",
                    cost_usd=(result.amount or Decimal(0)) / 100,
                )

    def _pages(self, path: str, params: Mapping[str, Any], *, beta: bool) -> Iterator[dict[str, Any]]:
        headers = {"x-api-key": self.admin_key, "anthropic-version": ANTHROPIC_VERSION}
        if beta:
            headers["anthropic-beta"] = ANALYTICS_BETA
        page: str | None = None
        seen: set[str] = set()
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=60, transport=self.transport) as client:
            for _ in range(MAX_PAGES):
                query = {**params, **({"page": page} if page else {})}
                answer = _parse(_Page, self._get(client, path, query))
                yield from answer.data
                if not answer.has_more or not answer.next_page:
                    return
                if answer.next_page in seen:
                    raise ReportError(f"{path} gave the page cursor {answer.next_page[:40]!r} twice; stopping")
                seen.add(answer.next_page)
                page = answer.next_page
        raise ReportError(f"{path} had more than {MAX_PAGES} pages; narrow the period")

    def _get(self, client: httpx.Client, path: str, query: Mapping[str, Any]) -> Any:
        wait = 1.0
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = client.get(path, params=query)
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS:
                    raise ReportError(f"cannot reach the Admin API at {self.base_url}: {exc}") from None
                self.sleep(wait)
                wait = min(wait * 2, MAX_WAIT_SECONDS)
                continue
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise ReportError(f"{path} answered 200 with a body that is not JSON") from None
            if response.status_code == 404 and "/analytics/" in path:
                raise _Missing
            retryable = response.status_code in (408, 409, 429) or response.status_code >= 500
            if not retryable or attempt == ATTEMPTS:
                raise ReportError(f"{path} answered {response.status_code}: {_error_text(response)}")
            self.sleep(min(_retry_after(response) or wait, MAX_WAIT_SECONDS))
            wait = min(wait * 2, MAX_WAIT_SECONDS)
        raise AssertionError("unreachable")  # the loop returns or raises


class _Missing(Exception):
    """The analytics endpoints are not there: use the legacy ones."""


def _windows(since: datetime, until: datetime) -> Iterator[tuple[datetime, datetime]]:
    start = since
    while start < until:
        end = min(start + MAX_RANGE, until)
        yield start, end
        start = end


def _parse(model: type[Parsed], data: Any) -> Parsed:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ReportError(f"the Admin API answered something unexpected ({model.__name__}): {exc}") from None


def _check_currency(currency: str) -> None:
    if currency != "USD":
        raise ReportError(f"the cost report is in {currency}; spendgate compares USD only")


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return f"{error.get('type')}: {error.get('message')}"
    except (ValueError, AttributeError):
        return response.text[:300]


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
