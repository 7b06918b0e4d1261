"""The worst case: the most a Messages request can cost before it goes out, which a budget must be able to hold.

Read from the request alone (no tokenizer): input is bounded by the body's bytes, output by `max_tokens`, and each
priced at the dearest rate the request could incur.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from proxy.pricing.table import PriceTable
from proxy.types import Usage

# Anthropic resizes images before tokenizing; even the largest accepted image stays under this many tokens
# (https://docs.claude.com/en/docs/build-with-claude/vision, "Evaluate image size"), with margin for newer
# models' higher resolution.
IMAGE_TOKEN_BOUND = 5_000
# The system prompt Anthropic adds when tools are present (a few hundred tokens per the tool-use docs).
TOOLS_TOKEN_BOUND = 1_000
# Web search runs as many searches as the model wants unless `max_uses` caps it; without a cap we hold this many.
DEFAULT_WEB_SEARCH_USES = 10


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
