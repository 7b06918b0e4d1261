"""A fake Anthropic Admin API: usage and cost reports, in the recorded formats, of what the fake upstream served.

It serves the analytics endpoints (unless `legacy_only`, then they are 404 as for an organisation without the
beta) and the legacy ones; pages of `page_size` rows; a 429 with `retry-after` before its first answer; usage
after `late_after` not yet reported (a late bucket). Costs come from `prices` (Anthropic's real prices: the
shipped table unless a test says otherwise), in cents as text. `tamper` turns an honest page into a hostile or
broken answer.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from proxy.gateway.usage import parse_usage
from proxy.pricing.table import PriceTable

ADMIN_KEY = "sk-ant-admin01-fake"
KEY_ID = "apikey_01fake"
WIDTHS = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}


@dataclass(frozen=True)
class Raw:
    """An answer sent as it is: `body` `repeat` times, in chunks without a content-length when repeated."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    repeat: int = 1


# Given the path and the page the fake would answer: the page to answer instead, or a `Raw` answer.
Tamper = Callable[[str, dict[str, Any]], "dict[str, Any] | Raw"]


@dataclass
class FakeAdminAPI:
    served: list[tuple[datetime, str, dict[str, Any]]]
    prices: PriceTable = field(default_factory=PriceTable.load)
    legacy_only: bool = False
    page_size: int = 1
    late_after: datetime | None = None
    throttled: bool = False  # set once the first request was answered 429
    asked: list[str] = field(default_factory=list)
    tamper: Tamper | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        query = parse_qs(scope["query_string"].decode())
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.asked.append(path)
        if headers.get("x-api-key") != ADMIN_KEY:
            return await _answer(
                send, 401, {"type": "error", "error": {"type": "authentication_error", "message": "x"}}
            )
        if not self.throttled:
            self.throttled = True
            error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
            return await _answer(send, 429, error, [(b"retry-after", b"0")])
        analytics = path.startswith("/v1/organizations/analytics/")
        if analytics and (
            self.legacy_only or "analytics-usage-cost-2026-08-24" not in headers.get("anthropic-beta", "")
        ):
            return await _answer(send, 404, {"type": "error", "error": {"type": "not_found_error", "message": "x"}})
        assert query.get("api_key_ids[]") in (None, [KEY_ID])
        since = datetime.fromisoformat(query["starting_at"][0])
        until = datetime.fromisoformat(query["ending_at"][0])
        width = (query.get("time_bucket_width") or query.get("bucket_width") or ["1d"])[0]
        buckets = self._buckets(since, until, WIDTHS[width])
        if path == "/v1/organizations/analytics/usage":
            rows = [_usage_row(start, width, model, tier, usage) for (start, model, tier), usage in buckets.items()]
        elif path == "/v1/organizations/analytics/cost":
            rows = [
                {
                    "starting_at": _iso(start),
                    "ending_at": _iso(start + WIDTHS[width]),
                    "group": {"model": model, "service_tier": tier},
                    "cost": {
                        "amount": format(cost * 100, "f"),
                        "list_amount": format(cost * 100, "f"),
                        "currency": "USD",
                    },
                }
                for (start, model, tier), (_, cost) in self._costs(buckets).items()
            ]
        elif path == "/v1/organizations/usage_report/messages":
            rows = _legacy(
                buckets,
                since,
                until,
                WIDTHS[width],
                lambda model, tier, usage: {**_tokens(usage), "model": model, "service_tier": tier},
            )
        elif path == "/v1/organizations/cost_report":
            costs = self._costs(buckets)
            rows = _legacy(
                buckets,
                since,
                until,
                WIDTHS["1d"],
                lambda model, tier, usage: {
                    "amount": format(costs[next(k for k in costs if k[1:] == (model, tier))][1] * 100, "f"),
                    "currency": "USD",
                    "model": model,
                    "service_tier": tier,
                },
            )
        else:
            return await _answer(send, 404, {"type": "error", "error": {"type": "not_found_error", "message": path}})
        offset = int((query.get("page") or ["0"])[0])
        page = rows[offset : offset + self.page_size]
        more = offset + self.page_size < len(rows)
        honest = {"data": page, "has_more": more, "next_page": str(offset + self.page_size) if more else None}
        answer = honest if self.tamper is None else self.tamper(path, honest)
        if isinstance(answer, Raw):
            return await _raw(send, answer)
        await _answer(send, 200, answer)

    def _buckets(
        self, since: datetime, until: datetime, width: timedelta
    ) -> dict[tuple[datetime, str, str], dict[str, int]]:
        found: dict[tuple[datetime, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for at, model, usage in self.served:
            if not since <= at < until or (self.late_after is not None and at >= self.late_after):
                continue
            start = since + ((at - since) // width) * width
            counts = found[(start, model, usage.get("service_tier", "standard"))]
            parsed = parse_usage(usage)
            for kind, value in (
                ("input", parsed.input_tokens),
                ("output", parsed.output_tokens),
                ("cache_write_5m", parsed.cache_creation_5m_input_tokens),
                ("cache_write_1h", parsed.cache_creation_1h_input_tokens),
                ("cache_read", parsed.cache_read_input_tokens),
            ):
                counts[kind] += value
        return found

    def _costs(
        self, buckets: dict[tuple[datetime, str, str], dict[str, int]]
    ) -> dict[tuple[datetime, str, str], tuple[dict[str, int], Decimal]]:
        from proxy.types import Usage

        priced = {}
        for (start, model, tier), counts in buckets.items():
            usage = Usage(
                input_tokens=counts["input"],
                output_tokens=counts["output"],
                cache_creation_5m_input_tokens=counts["cache_write_5m"],
                cache_creation_1h_input_tokens=counts["cache_write_1h"],
                cache_read_input_tokens=counts["cache_read"],
                service_tier=tier,
            )
            cost = self.prices.price(model=model, usage=usage, at=start).cost_usd or Decimal(0)
            priced[(start, model, tier)] = (counts, cost)
        return priced


def _usage_row(start: datetime, width: str, model: str, tier: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "starting_at": _iso(start),
        "ending_at": _iso(start + WIDTHS[width]),
        "group": {"model": model, "service_tier": tier, "api_key_id": None, "workspace_id": None},
        "usage": {**_tokens(counts), "requests": None, "total_tokens": sum(counts.values())},
    }


def _tokens(counts: dict[str, int]) -> dict[str, Any]:
    return {
        "uncached_input_tokens": counts["input"],
        "output_tokens": counts["output"],
        "cache_read_input_tokens": counts["cache_read"],
        "cache_creation": {
            "ephemeral_5m_input_tokens": counts["cache_write_5m"],
            "ephemeral_1h_input_tokens": counts["cache_write_1h"],
        },
        "server_tool_use": {"web_search_requests": 0},
    }


def _legacy(
    buckets: dict[tuple[datetime, str, str], dict[str, int]],
    since: datetime,
    until: datetime,
    width: timedelta,
    result: Any,
) -> list[dict[str, Any]]:
    """Legacy buckets: every interval, oldest first, empty ones with `results: []`."""
    rows = []
    start = since
    while start < until:
        results = [result(model, tier, usage) for (at, model, tier), usage in buckets.items() if at == start]
        rows.append({"starting_at": _iso(start), "ending_at": _iso(start + width), "results": results})
        start += width
    return rows


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _answer(send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _raw(send: Send, answer: Raw) -> None:
    headers = [*answer.headers]
    if answer.repeat == 1:
        headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    for n in range(answer.repeat):
        await send({"type": "http.response.body", "body": answer.body, "more_body": n < answer.repeat - 1})
