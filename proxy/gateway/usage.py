"""Extract token usage, the serving model and any error from Anthropic Messages API responses.

Field meanings: https://docs.claude.com/en/api/messages and
https://docs.claude.com/en/docs/build-with-claude/prompt-caching; stream semantics:
https://docs.claude.com/en/docs/build-with-claude/streaming (anthropic-wire.md §1 and §2).
Upstream bodies are untrusted input: a value of the wrong type, or `null`, counts as absent, and nothing
here raises on malformed data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.gateway.sse import SSEDecoder
from proxy.types import IterationUsage, Usage

# Only these stream events carry anything metering needs. The name is checked before the JSON is parsed,
# so the many content_block_delta events cost no parsing at all.
_PARSED_EVENTS = frozenset({"message_start", "message_delta", "content_block_start", "error"})


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageSummary:
    """What metering needs from one response: usage, the model that served it, and how it ended."""

    usage: Usage | None
    response_model: str | None
    error_type: str | None
    complete: bool


def parse_usage(usage: Mapping[str, Any]) -> Usage:
    """Read one `usage` object, such as `Message.usage` or a batch result's `message.usage`."""
    return _merge_usage(Usage(), usage)


def summarize_json(body: bytes) -> MessageSummary:
    """Summarize a non-streaming `/v1/messages` response body: a Message, an error body, or garbage.

    Error bodies are recognised by their `error` object alone, because 413s come from Cloudflare without
    the top-level `"type": "error"` (anthropic-wire.md §3.2).
    """
    payload = _load(body)
    if payload is None:
        return MessageSummary(usage=None, response_model=None, error_type=None, complete=False)
    usage = _mapping(payload.get("usage"))
    error = _mapping(payload.get("error"))
    model = _str(payload.get("model"), None)
    content = payload.get("content")
    if isinstance(content, list):
        for block in content:
            model = _fallback_model(block, model)
    return MessageSummary(
        usage=None if usage is None else parse_usage(usage),
        response_model=model,
        error_type=None if error is None else _str(error.get("type"), None),
        complete=payload.get("type") == "message",
    )


class StreamUsage:
    """Accumulates usage from an SSE byte stream as chunks pass through the proxy.

    `message_start` gives the initial usage; each `message_delta` carries cumulative totals that overwrite
    the fields it has and leave the others alone, as the official SDKs' stream accumulators do.
    """

    __slots__ = ("_complete", "_decoder", "_error_type", "_model", "_usage")

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._usage: Usage | None = None
        self._model: str | None = None
        self._error_type: str | None = None
        self._complete = False

    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the response body, after any `content-encoding` has been undone."""
        for event in self._decoder.feed(chunk):
            if event.event == "message_stop":
                self._complete = True
            elif event.event in _PARSED_EVENTS:
                payload = _load(event.data)
                if payload is not None:
                    self._apply(event.event, payload)

    def summary(self) -> MessageSummary:
        """Everything seen so far; a stream cut short still reports the usage it had reached."""
        return MessageSummary(
            usage=self._usage, response_model=self._model, error_type=self._error_type, complete=self._complete
        )

    def _apply(self, name: str, payload: Mapping[str, Any]) -> None:
        if name == "message_start":
            message = _mapping(payload.get("message")) or {}
            self._model = _str(message.get("model"), self._model)
            usage = _mapping(message.get("usage"))
            if usage is not None:
                self._usage = parse_usage(usage)
        elif name == "message_delta":
            usage = _mapping(payload.get("usage"))
            if usage is not None:
                self._usage = _merge_usage(self._usage or Usage(), usage)
            delta = _mapping(payload.get("delta")) or {}
            # Docs: "One or more message_delta events"; a stop_reason marks the end even if message_stop is lost.
            if delta.get("stop_reason") is not None:
                self._complete = True
        elif name == "content_block_start":
            self._model = _fallback_model(payload.get("content_block"), self._model)
        else:
            # Mid-stream errors arrive after a 200, e.g. overloaded_error (docs: streaming, "Error events").
            error = _mapping(payload.get("error")) or {}
            self._error_type = _str(error.get("type"), self._error_type)


def _merge_usage(base: Usage, raw: Mapping[str, Any]) -> Usage:
    """Overwrite `base` with every field `raw` carries; a delta's counts are totals, never increments."""
    cache_5m, cache_1h = _cache_writes(raw, base.cache_creation_5m_input_tokens, base.cache_creation_1h_input_tokens)
    tools = _mapping(raw.get("server_tool_use")) or {}
    iterations = raw.get("iterations")
    return Usage(
        input_tokens=_int(raw.get("input_tokens"), base.input_tokens),
        output_tokens=_int(raw.get("output_tokens"), base.output_tokens),
        cache_creation_5m_input_tokens=cache_5m,
        cache_creation_1h_input_tokens=cache_1h,
        cache_read_input_tokens=_int(raw.get("cache_read_input_tokens"), base.cache_read_input_tokens),
        # Unknown server tools (the pricing docs show `code_execution_requests`) are not metered here.
        web_search_requests=_int(tools.get("web_search_requests"), base.web_search_requests),
        web_fetch_requests=_int(tools.get("web_fetch_requests"), base.web_fetch_requests),
        service_tier=_str(raw.get("service_tier"), base.service_tier),
        speed=_str(raw.get("speed"), base.speed),
        inference_geo=_str(raw.get("inference_geo"), base.inference_geo),
        iterations=(
            tuple(_iteration(entry) for entry in iterations if isinstance(entry, Mapping))
            if isinstance(iterations, list)
            else base.iterations
        ),
    )


def _cache_writes(raw: Mapping[str, Any], cache_5m: int, cache_1h: int) -> tuple[int, int]:
    """Split cache writes into (5m, 1h), starting from the split known so far."""
    breakdown = _mapping(raw.get("cache_creation"))
    if breakdown is not None:
        return (
            _int(breakdown.get("ephemeral_5m_input_tokens"), cache_5m),
            _int(breakdown.get("ephemeral_1h_input_tokens"), cache_1h),
        )
    total = raw.get("cache_creation_input_tokens")
    if type(total) is not int:
        return cache_5m, cache_1h
    # Without a breakdown every write counts as 5m (spec: "cache writes without a TTL breakdown count as 5m").
    # A message_delta brings a new total but never a breakdown (anthropic-wire.md §2.2). The 1h writes come from
    # the request's own cache_control breakpoints, already counted at message_start; what grows during a turn
    # is server-tool results, which are cached automatically with the 5m TTL (prompt-caching docs). So the 1h
    # part is kept and the rest of the total is 5m.
    return max(total - cache_1h, 0), cache_1h


def _iteration(entry: Mapping[str, Any]) -> IterationUsage:
    """Read one entry of the beta `usage.iterations` list."""
    cache_5m, cache_1h = _cache_writes(entry, 0, 0)
    return IterationUsage(
        # An untyped entry's tokens are still billed (compaction docs: sum all iterations), so keep it.
        type=_str(entry.get("type"), None) or "unknown",
        model=_str(entry.get("model"), None),
        input_tokens=_int(entry.get("input_tokens"), 0),
        output_tokens=_int(entry.get("output_tokens"), 0),
        cache_creation_5m_input_tokens=cache_5m,
        cache_creation_1h_input_tokens=cache_1h,
        cache_read_input_tokens=_int(entry.get("cache_read_input_tokens"), 0),
    )


def _fallback_model(block: object, model: str | None) -> str | None:
    """Return the model a beta `fallback` block hands over to, else `model`.

    The request names the model that was asked for; after a server-side fallback the block's `to.model`
    served and billed the response (the SDKs' accumulators set `snapshot.model` from it).
    """
    if not isinstance(block, Mapping) or block.get("type") != "fallback":
        return model
    target = _mapping(block.get("to")) or {}
    return _str(target.get("model"), model)


def _load(data: str | bytes) -> Mapping[str, Any] | None:
    """Parse a JSON object, or return None for anything else, including malformed or non-object JSON."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _mapping(value: object) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None


def _int(value: object, default: int) -> int:
    # `type() is int` rejects bools, which JSON parsing would otherwise let through as ints.
    return value if type(value) is int else default


def _str(value: object, default: str | None) -> str | None:
    return value if isinstance(value, str) else default
