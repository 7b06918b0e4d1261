"""`GET /v1/models` and `GET /v1/models/{model_id}`: a key is shown the models it may use, upstream or not.

Claude Code asks for `/v1/models?limit=1000` as it starts (with `CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1`),
gives the answer 3 s, and offers the models it gets. So:

- a team without an allow-list gets the upstream's answer untouched, as on any other route;
- a team with one is shown the models the upstream lists whose id the allow-list names: the exact-id rule that
  admits a Messages call (`proxy/gateway/limits.py`), so every model shown can be called. spendgate asks the upstream
  for its whole catalogue (one page of 1,000, the API's largest) and pages the filtered list itself, so `first_id`,
  `last_id` and `has_more` describe what the client is shown and its cursors lead where the SDKs expect;
- when the upstream cannot say (unreachable, no answer within `wait_seconds`, a 5xx, or a list spendgate cannot
  read), spendgate answers 200 itself from what it knows: the allow-list, or without one the models of the price
  table in force. Synthesized for each: `display_name` made from the id (`claude-sonnet-4-6`: "Claude Sonnet 4.6"),
  and `created_at` the snapshot date the id ends with (`-20250929`), else the Unix epoch, which is what Anthropic's
  API reference says it sends when a release date is unknown. They are listed newest generation first.

Each call leaves one record, unmetered (cost null) like every route spendgate does not price: its outcome what the
upstream did (`ok`, `upstream_error`, `upstream_unreachable`), its status what the client was answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.types import Receive, Scope, Send

from proxy.errors import BadRequest, ModelNotFound, ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.gateway.call import Call, label
from proxy.gateway.meters import respond_plain
from proxy.gateway.relay import Headers, Relay, read_whole, send_whole, stream_back
from proxy.gateway.routes import Route
from proxy.gateway.upstream import UpstreamResponse
from proxy.gateway.usage import summarize_json
from proxy.ledger.keys import KeyInfo
from proxy.pricing.table import PriceTable
from proxy.pricing.versions import undated

# Anthropic's page sizes for lists.
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
PAGING = frozenset({"limit", "after_id", "before_id"})
EPOCH = "1970-01-01T00:00:00Z"
_SNAPSHOT = re.compile(r"-(\d{8})$")
Model = dict[str, Any]


class Models:
    """The two model routes. `wait_seconds`: how long the list waits for the upstream (Claude Code waits 3 s in all,
    so spendgate must answer it before that)."""

    def __init__(self, relay: Relay, prices: PriceTable, *, wait_seconds: float) -> None:
        self._relay = relay
        self._prices = prices
        self._wait = wait_seconds

    async def retrieve(
        self, call: Call, route: Route, key: KeyInfo, scope: Scope, receive: Receive, send: Send, body: bytes
    ) -> None:
        """One model: not found unless the team may use it, then forwarded untouched."""
        if key.models is not None and route.model_id not in key.models:
            raise ModelNotFound(
                f"model: {route.model_id}. Team {key.team} may not use it; /v1/models lists the models it may use."
            )
        await self._relay.exchange(call, route, scope, receive, body, respond_plain(call, send))

    async def list(
        self, call: Call, route: Route, key: KeyInfo, scope: Scope, receive: Receive, send: Send, body: bytes
    ) -> None:
        """The list: the upstream's, filtered by the allow-list, or spendgate's own when the upstream cannot say."""
        query = parse_qsl(scope["query_string"].decode("ascii"), keep_blank_values=True)
        allowed = None if key.models is None else frozenset(key.models)
        if allowed is not None:
            # Checked before anything goes out: the upstream is not asked for this page, so it cannot refuse it.
            paging = Paging.read(query)
            scope = {**scope, "query_string": _whole_catalogue(query)}
        answered = False

        async def respond(response: UpstreamResponse, headers: Headers) -> None:
            nonlocal answered
            if response.status >= 500:
                call.facts.error_type = _error_type(await read_whole(response, call))
                return
            if allowed is None or response.status >= 300:
                waiting.reschedule(None)
                await stream_back(call, response, send, headers, None)
                answered = True
                return
            catalogue = _catalogue(await read_whole(response, call))
            waiting.reschedule(None)
            if catalogue is None:
                call.facts.error_type = "invalid_response"
                return
            shown = paging.page([model for model in catalogue if model["id"] in allowed])
            call.status = 200
            await send_whole(call, send, 200, headers, json.dumps(shown).encode())
            answered = True

        try:
            async with asyncio.timeout(self._wait) as waiting:
                await self._relay.exchange(call, route, scope, receive, body, respond, identity=allowed is not None)
        except (UpstreamUnreachable, UpstreamTimeout, TimeoutError) as error:
            # Time spent waiting on the upstream is not spendgate's overhead.
            call.upstream_done = time.perf_counter()
            call.facts.cut = (
                error
                if isinstance(error, ProxyError)
                else UpstreamTimeout(f"The upstream did not list its models within {self._wait:g} s.")
            )
        if answered or call.facts.disconnected:
            return
        page = Paging.read(query).page(known_models(key, self._prices, call.started_at))
        call.status = 200
        headers = [(b"content-type", b"application/json"), (b"x-spendgate-request-id", call.id.encode())]
        await send_whole(call, send, 200, headers, json.dumps(page).encode())


@dataclass(frozen=True, slots=True)
class Paging:
    """A list request's page, as Anthropic's list endpoints read it: `limit` items after `after_id`, or before
    `before_id`, or from the start."""

    limit: int
    after_id: str | None
    before_id: str | None

    @classmethod
    def read(cls, query: list[tuple[str, str]]) -> Paging:
        """The page a query asks for; `BadRequest` for a `limit` out of 1..1000."""
        values = dict(query)
        limit = values.get("limit", str(DEFAULT_LIMIT))
        # At most four ASCII digits: int() of a long or non-ASCII digit string is slow or raises.
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 4 and 1 <= int(limit) <= MAX_LIMIT):
            raise BadRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}, not {limit[:20]!r}.")
        return cls(int(limit), values.get("after_id") or None, values.get("before_id") or None)

    def page(self, models: list[Model]) -> dict[str, Any]:
        """This page of `models` in Anthropic's list shape; a cursor naming no listed model gives an empty page."""
        ids = [model["id"] for model in models]
        if self.before_id is not None:
            end = ids.index(self.before_id) if self.before_id in ids else 0
            start = max(0, end - self.limit)
            more = start > 0
        else:
            if self.after_id is None:
                start = 0
            else:
                start = ids.index(self.after_id) + 1 if self.after_id in ids else len(ids)
            end = start + self.limit
            more = end < len(ids)
        data = models[start:end]
        return {
            "data": data,
            "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }


def known_models(key: KeyInfo, prices: PriceTable, at: datetime) -> list[Model]:
    """What spendgate lists without the upstream: the team's allow-list, else the models priced at `at`."""
    ids = key.models if key.models is not None else prices.models(at)
    models = [synthesized(model_id) for model_id in dict.fromkeys(ids)]
    return sorted(models, key=lambda model: (_generation(model["id"]), model["created_at"], model["id"]), reverse=True)


def synthesized(model_id: str) -> Model:
    """A model entry in Anthropic's shape made from its id alone."""
    return {"type": "model", "id": model_id, "display_name": display_name(model_id), "created_at": _created(model_id)}


def display_name(model_id: str) -> str:
    """Anthropic's naming: `claude-sonnet-4-6` is "Claude Sonnet 4.6", `claude-3-5-haiku-20241022` "Claude Haiku
    3.5"; an id that is not a Claude model's is its own name."""
    parts = undated(model_id).split("-")
    if parts[0] != "claude" or len(parts) < 2:
        return model_id
    words = [part.capitalize() for part in parts[1:] if not part.isdigit()]
    version = ".".join(part for part in parts[1:] if part.isdigit())
    return " ".join(["Claude", *words, *([version] if version else [])])


def _created(model_id: str) -> str:
    snapshot = _SNAPSHOT.search(model_id)
    if snapshot is None:
        return EPOCH
    try:
        return datetime.strptime(snapshot.group(1), "%Y%m%d").strftime("%Y-%m-%dT00:00:00Z")
    except ValueError:
        return EPOCH


def _generation(model_id: str) -> tuple[int, ...]:
    """The version numbers in an id (`claude-3-7-sonnet`: 3, 7), by which newer models sort later."""
    return tuple(int(part) for part in undated(model_id).split("-") if part.isdigit() and len(part) <= 3)


def _whole_catalogue(query: list[tuple[str, str]]) -> bytes:
    """The client's query with its paging replaced by one page of everything."""
    return urlencode([*((name, value) for name, value in query if name not in PAGING), ("limit", MAX_LIMIT)]).encode()


def _catalogue(body: bytes) -> list[Model] | None:
    """The models of an upstream list answer; None when it is not one."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(model, dict) and isinstance(model.get("id"), str) for model in data
    ):
        return None
    return data


def _error_type(body: bytes) -> str | None:
    error_type = summarize_json(body).error_type
    return None if error_type is None else label(error_type, 100)
