"""Anthropic's own usage and cost figures, read through its Admin API.

The Usage and Cost Analytics API (beta) first; the legacy Usage and Cost API when the analytics endpoints are
not there (404). Both are normalised to `Reported` rows: one per (bucket, model, service tier), tokens of each
kind, and, for cost rows, USD. Every answer is validated before use; pages are followed, 429s waited out (their
`retry-after`), 5xx and network errors retried with backoff. Money arrives as text in cents and stays exact.

An answer is data from elsewhere: it is read no further than `MAX_ANSWER_BYTES`, waited for no longer than
`MAX_WAIT_SECONDS` in all, and every figure must be one a real report could hold. Anything else is a
`ReportError` whose one line names the report, the page and the field.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from proxy.display import explain
from proxy.types import TOKEN_KIND_FIELDS

ANTHROPIC_VERSION = "2023-06-01"
ANALYTICS_BETA = "analytics-usage-cost-2026-08-24"
# The analytics API serves at most 31 days per request.
MAX_RANGE = timedelta(days=31)
ATTEMPTS = 6
# A period of 31 days in hourly buckets, per model and tier, at 1,000 rows a page, is far below this.
MAX_PAGES = 1000
# What one request waits in all between its attempts, `retry-after`s and backoff together (the backoff alone,
# 1 + 2 + 4 + 8 + 16 s, fits): reconcile is run by a person, or by a server that tries again on its next round.
MAX_WAIT_SECONDS = 60.0
# A page of 1,000 rows is well under a megabyte.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
# Far past any organisation's bucket (10**15 tokens cost a billion dollars at the cheapest rate; 10**14 cents
# are a trillion dollars): bounds that keep a corrupt or hostile figure from overflowing Decimal arithmetic.
MAX_TOKENS = 10**15
MAX_CENTS = 10**14
# No model id or service tier is longer.
MAX_NAME = 200
# Compared per bucket: the token kinds, and web searches (billed per search).
TOKEN_KINDS = (*TOKEN_KIND_FIELDS, "web_search_requests")
Width = Literal["hour", "day"]
WIDTHS = {"hour": ("1h", timedelta(hours=1)), "day": ("1d", timedelta(days=1))}
# Legacy `limit` caps (buckets per page) per width.
LEGACY_LIMITS = {"1h": 168, "1d": 31}


Parsed = TypeVar("Parsed", bound=BaseModel)
# A count of tokens or of web searches in one bucket: a JSON integer (not `true`, not "5").
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS)]
# At most 28 significant digits, Decimal's default precision, so that dividing by 100 and adding stay exact, and
# no more than 20 places, so that no figure (`1e-999999999`) prints as a million digits.
Cents = Annotated[Decimal, Field(allow_inf_nan=False, ge=-MAX_CENTS, le=MAX_CENTS, max_digits=28, decimal_places=20)]
Name = Annotated[str, Field(max_length=MAX_NAME)]


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
    ephemeral_5m_input_tokens: Count = 0
    ephemeral_1h_input_tokens: Count = 0


class _ServerTools(_Loose):
    web_search_requests: Count = 0


class _Tokens(_Loose):
    uncached_input_tokens: Count = 0
    output_tokens: Count = 0
    cache_read_input_tokens: Count = 0
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
    model: Name | None = None
    service_tier: Name | None = None


class _Cost(_Loose):
    amount: Cents  # as text
    currency: Literal["USD"] = "USD"  # spendgate compares USD only


class _Bucket(_Loose):
    """A row of a report: the figures of one time bucket."""

    starting_at: AwareDatetime


Row = TypeVar("Row", bound=_Bucket)


class _UsageRow(_Bucket):
    group: _Group
    usage: _Tokens


class _CostRow(_Bucket):
    group: _Group
    cost: _Cost


class _Page(_Loose):
    data: list[Any]  # rows, each validated on its own so that a problem is named by its row
    has_more: bool | None = None
    next_page: str | None = None


class _LegacyResult(_Tokens, _Group):
    amount: Cents | None = None  # cost rows, as text
    currency: Literal["USD"] = "USD"


class _LegacyBucket(_Bucket):
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
        code, span = WIDTHS[width]
        path = f"/v1/organizations/analytics/{kind}"
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
            if kind == "usage":
                for usage in self._rows(path, params, _UsageRow, beta=True, period=(start - span, end)):
                    yield Reported(
                        start=usage.starting_at,
                        model=usage.group.model or "",
                        service_tier=usage.group.service_tier or "standard",
                        tokens=usage.usage.counts(),
                    )
            else:
                for cost in self._rows(path, params, _CostRow, beta=True, period=(start - span, end)):
                    yield Reported(
                        start=cost.starting_at,
                        model=cost.group.model or "",
                        service_tier=cost.group.service_tier or "standard",
                        cost_usd=cost.cost.amount / 100,
                    )

    def _legacy_usage(self, since: datetime, until: datetime, width: Width) -> Iterator[Reported]:
        code, span = WIDTHS[width]
        params: dict[str, Any] = {
            "starting_at": _rfc3339(since),
            "ending_at": _rfc3339(until),
            "bucket_width": code,
            "group_by[]": ["model", "service_tier"],
            "limit": LEGACY_LIMITS[code],
        }
        if self.api_key_id:
            params["api_key_ids[]"] = [self.api_key_id]
        path = "/v1/organizations/usage_report/messages"
        for bucket in self._rows(path, params, _LegacyBucket, beta=False, period=(since - span, until)):
            for result in bucket.results:
                yield Reported(
                    start=bucket.starting_at,
                    model=result.model or "",
                    service_tier=result.service_tier or "standard",
                    tokens=result.counts(),
                )

    def _legacy_cost(self, since: datetime, until: datetime) -> Iterator[Reported]:
        # Grouped by description: the only way the legacy cost report names models (web search rows name none).
        params = {
            "starting_at": _rfc3339(since),
            "ending_at": _rfc3339(until),
            "group_by[]": ["description"],
            "limit": 31,
        }
        period = (since - timedelta(days=1), until)
        for bucket in self._rows("/v1/organizations/cost_report", params, _LegacyBucket, beta=False, period=period):
            for result in bucket.results:
                yield Reported(
                    start=bucket.starting_at,
                    model=result.model or "",
                    service_tier=result.service_tier or "standard",
                    cost_usd=(result.amount or Decimal(0)) / 100,
                )

    def _rows(
        self,
        path: str,
        params: Mapping[str, Any],
        row: type[Row],
        *,
        beta: bool,
        period: tuple[datetime, datetime],
    ) -> Iterator[Row]:
        """Every row of a report, page after page, each validated as `row` and starting within `period` (which
        begins a bucket early: buckets snap to the start of their hour or day)."""
        headers = {"x-api-key": self.admin_key, "anthropic-version": ANTHROPIC_VERSION}
        if beta:
            headers["anthropic-beta"] = ANALYTICS_BETA
        page: str | None = None
        seen: set[str] = set()
        earliest, until = period
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=60, transport=self.transport) as client:
            for number in range(1, MAX_PAGES + 1):
                where = f"{path} page {number}"
                query = {**params, **({"page": page} if page else {})}
                answer = _parse(_Page, self._get(client, path, query, where), where)
                for index, raw in enumerate(answer.data):
                    parsed = _parse(row, raw, f"{where}, data.{index}")
                    if not earliest <= parsed.starting_at < until:
                        raise ReportError(
                            f"the Admin API answered a bucket outside the period asked on {where}, data.{index}: "
                            f"'starting_at' {parsed.starting_at.isoformat()} is not from {_rfc3339(earliest)} to "
                            f"{_rfc3339(until)}"
                        )
                    yield parsed
                if not answer.has_more or not answer.next_page:
                    return
                if answer.next_page in seen:
                    raise ReportError(f"{where} gave the page cursor {answer.next_page[:40]!r} twice; stopping")
                seen.add(answer.next_page)
                page = answer.next_page
        raise ReportError(f"{path} had more than {MAX_PAGES} pages; narrow the period")

    def _get(self, client: httpx.Client, path: str, query: Mapping[str, Any], where: str) -> Any:
        """The JSON of one page, retrying what is worth retrying within `MAX_WAIT_SECONDS` of waiting in all."""
        waited, backoff = 0.0, 1.0
        for attempt in range(1, ATTEMPTS + 1):
            retry_after = None
            try:
                status, retry_after, body = _fetch(client, path, query, where)
            except httpx.TransportError as exc:
                problem = f"cannot reach the Admin API at {self.base_url}: {exc}"
            else:
                if status == 200:
                    return _decode(body, where)
                if status == 404 and "/analytics/" in path:
                    raise _Missing
                problem = f"{where} answered {status}: {_error_text(body)}"
                if status not in (408, 409, 429) and status < 500:
                    raise ReportError(problem)
            if attempt == ATTEMPTS:
                raise ReportError(problem)
            pause = retry_after or backoff
            if waited + pause > MAX_WAIT_SECONDS:
                asked = " as its retry-after asks" if retry_after else ""
                raise ReportError(
                    f"{problem}; waiting {pause:g} s more{asked} would pass the {MAX_WAIT_SECONDS:g} s spendgate "
                    "waits in all for one request: try again later"
                )
            self.sleep(pause)
            waited += pause
            backoff *= 2
        raise AssertionError("unreachable")  # the loop returns or raises


class _Missing(Exception):
    """The analytics endpoints are not there: use the legacy ones."""


def _windows(since: datetime, until: datetime) -> Iterator[tuple[datetime, datetime]]:
    start = since
    while start < until:
        end = min(start + MAX_RANGE, until)
        yield start, end
        start = end


def _fetch(client: httpx.Client, path: str, query: Mapping[str, Any], where: str) -> tuple[int, float | None, bytes]:
    """The status, `retry-after` and body of one GET, the body read no further than `MAX_ANSWER_BYTES`."""
    with client.stream("GET", path, params=query) as response:
        body = bytearray()
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise ReportError(f"{where} answered more than {MAX_ANSWER_BYTES} bytes, far more than a page")
        except httpx.DecodingError as exc:
            raise ReportError(f"{where} answered a body that cannot be decoded ({exc})") from None
        return response.status_code, _retry_after(response), bytes(body)


def _decode(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise ReportError(f"{where} answered JSON nested too deeply to read") from None
    except ValueError:
        raise ReportError(f"{where} answered 200 with a body that is not JSON") from None


def _parse(model: type[Parsed], data: Any, where: str) -> Parsed:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ReportError(f"the Admin API answered something unexpected on {where}: {_clip(explain(exc))}") from None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _error_text(body: bytes) -> str:
    """What an error answer says: its type and message in Anthropic's error shape, else its text."""
    try:
        error = json.loads(body)["error"]
        text = f"{error['type']}: {error['message']}"
    except (ValueError, RecursionError, LookupError, TypeError):
        text = body.decode("utf-8", "replace")
    return _clip(text)


def _clip(text: str, limit: int = 300) -> str:
    """At most `limit` characters of `text`: an error line, not the answer it quotes."""
    return text if len(text) <= limit else text[:limit] + "..."


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
