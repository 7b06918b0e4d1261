"""Pre-flight rules for a Messages request: the model allow-list, the output cap, and the worst-case cost
that a budget must be able to hold before the call goes out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from proxy.errors import ModelNotAllowed, OutputCapExceeded
from proxy.pricing.table import PriceTable
from proxy.types import CapPolicy, Usage

# Anthropic resizes images before tokenizing; even the largest accepted image stays under this many tokens
# (https://docs.claude.com/en/docs/build-with-claude/vision, "Evaluate image size"), with margin for newer
# models' higher resolution.
IMAGE_TOKEN_BOUND = 5_000
# The system prompt Anthropic adds when tools are present (a few hundred tokens per the tool-use docs).
TOOLS_TOKEN_BOUND = 1_000
# Web search runs as many searches as the model wants unless `max_uses` caps it; without a cap we hold this many.
DEFAULT_WEB_SEARCH_USES = 10
# Extended thinking requires budget_tokens >= 1024 and < max_tokens.
MIN_THINKING_BUDGET = 1_024


@dataclass(frozen=True, slots=True, kw_only=True)
class CappedRequest:
    """The request as it will be sent: its body (rewritten only when clamped) and its `max_tokens`."""

    body: bytes
    max_tokens: int | None


def check_model(model: str | None, allowed: tuple[str, ...] | None, team: str) -> None:
    """Raise `ModelNotAllowed` unless the team's allow-list (None: everything) admits the model."""
    if allowed is None or model in allowed:
        return
    raise ModelNotAllowed(
        f"Team {team} may not use model {model!r}. Allowed models: {', '.join(allowed)}. "
        "Ask your spendgate admin to change the team's allow-list."
    )


def cap_output(request: dict[str, Any], body: bytes, *, cap: int | None, policy: CapPolicy, team: str) -> CappedRequest:
    """Apply the output cap: pass, clamp `max_tokens` (and a thinking budget above it), or raise `OutputCapExceeded`."""
    max_tokens = request.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return CappedRequest(body=body, max_tokens=None)
    if cap is None or max_tokens <= cap:
        return CappedRequest(body=body, max_tokens=max_tokens)
    if policy == "reject":
        raise OutputCapExceeded(
            f"max_tokens {max_tokens} is above team {team}'s output cap of {cap}. Send max_tokens <= {cap}."
        )
    clamped = dict(request, max_tokens=cap)
    thinking = request.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict) and isinstance(budget, int) and budget >= cap:
        if cap <= MIN_THINKING_BUDGET:
            raise OutputCapExceeded(
                f"Team {team}'s output cap of {cap} tokens leaves no room for extended thinking, whose budget must "
                f"be at least {MIN_THINKING_BUDGET} and below max_tokens. Disable thinking or ask for a higher cap."
            )
        # Keep half the capped output for the answer itself, as the thinking docs advise.
        clamped["thinking"] = dict(thinking, budget_tokens=max(MIN_THINKING_BUDGET, cap // 2))
    return CappedRequest(body=json.dumps(clamped, separators=(",", ":")).encode(), max_tokens=cap)


def input_token_bound(request: dict[str, Any], body_size: int) -> int:
    """An upper bound on the input tokens a request can be billed for.

    A token is never shorter than one byte of text, so the body's size bounds its text; base64 image data is
    replaced by `IMAGE_TOKEN_BOUND` per image (a URL image adds the same). Documents keep their bytes (a PDF's
    base64 is far longer than its tokens). Tools add `TOOLS_TOKEN_BOUND` for the system prompt they bring.
    """
    bound = body_size
    images, image_bytes = _images(request)
    bound += images * IMAGE_TOKEN_BOUND - image_bytes
    if request.get("tools"):
        bound += TOOLS_TOKEN_BOUND
    return bound


def estimate_cost(
    request: dict[str, Any],
    *,
    model: str,
    input_tokens: int,
    max_tokens: int | None,
    prices: PriceTable,
    at: datetime,
    batch: bool = False,
) -> Decimal | None:
    """The most this call can cost, or None when the model has no price.

    The input is priced at the dearest rate it could incur: plain input, 5-minute cache writes (server tools
    cache their results unasked) or, when the request asks for a 1-hour TTL anywhere, 1-hour writes. The output
    is `max_tokens` at the output rate; fast mode and US data residency apply when the request asks for them;
    long-context tiers apply through the pricing rules since every input token counts toward the threshold.
    """
    found = prices.lookup(model, at)
    if found is None:
        return None
    fast = request.get("speed") == "fast"
    # Every input-side kind is priced at the same tier (the tier depends on the input's size only), so the
    # dearest kind is the one with the dearest rate: one exact pricing of that shape is the maximum.
    kinds = ["input_tokens", "cache_creation_5m_input_tokens"]
    if _asks_for_1h_cache(request):
        kinds.append("cache_creation_1h_input_tokens")
    rates = found[0].rates(fast=fast, context_tokens=input_tokens)
    shape: dict[str, Any] = {max(kinds, key=lambda kind: rates.input_rate(kind, batch=batch)): input_tokens}
    usage = Usage(
        **shape,
        output_tokens=max_tokens or 0,
        web_search_requests=_web_search_uses(request),
        speed="fast" if fast else None,
        inference_geo="us" if request.get("inference_geo") == "us" else None,
        service_tier="batch" if batch else None,
    )
    return prices.price(model=model, usage=usage, at=at).cost_usd


def _walk(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every object nested in the request, without recursion (a client can nest as deep as the parser allows)."""
    stack: list[Any] = [request]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(value for value in node.values() if isinstance(value, list | dict))
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, list | dict))


def _images(request: dict[str, Any]) -> tuple[int, int]:
    """How many image blocks the request's messages hold, and how many bytes of base64 data they carry.

    Only where Anthropic reads an image: a block of a message's content, or of a `tool_result`'s content. The same
    shape anywhere else (a tool's `input_schema`, metadata, a text block's fields) is text to the model, billed by
    its bytes: counting it as an image would let a client shrink the worst case of a huge body to nothing.
    """
    count = size = 0
    for block in _message_blocks(request):
        nested = _blocks(block.get("content")) if block.get("type") == "tool_result" else ()
        for image in (block, *nested):
            if image.get("type") == "image":
                source = image.get("source")
                data = source.get("data") if isinstance(source, dict) else None
                count, size = count + 1, size + (len(data) if isinstance(data, str) else 0)
    return count, size


def _message_blocks(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    messages = request.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            yield from _blocks(message.get("content"))


def _blocks(content: Any) -> Iterator[dict[str, Any]]:
    """The content blocks of a content field (a plain string has none)."""
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            yield block


def _asks_for_1h_cache(request: dict[str, Any]) -> bool:
    for node in _walk(request):
        cache_control = node.get("cache_control")
        if isinstance(cache_control, dict) and cache_control.get("ttl") == "1h":
            return True
    return False


def _web_search_uses(request: dict[str, Any]) -> int:
    tools = request.get("tools")
    uses = 0
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search"):
            max_uses = tool.get("max_uses")
            uses += max_uses if isinstance(max_uses, int) and max_uses > 0 else DEFAULT_WEB_SEARCH_USES
    return uses
