"""Pre-flight rules: allow-lists, output caps, and the worst-case estimate (dollars written out by hand)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, strategies as st

from proxy.errors import ModelNotAllowed, OutputCapExceeded
from proxy.gateway.limits import cap_output, check_model
from proxy.pricing.estimate import IMAGE_TOKEN_BOUND, TOOLS_TOKEN_BOUND, estimate_cost, input_token_bound
from proxy.pricing.table import PriceTable

AT = datetime(2026, 11, 20, tzinfo=UTC)
PRICES = PriceTable.load()


def test_allow_list() -> None:
    check_model("claude-sonnet-4-6", None, "research")
    check_model("claude-sonnet-4-6", ("claude-sonnet-4-6",), "research")
    with pytest.raises(ModelNotAllowed, match="Allowed models: claude-haiku-4-5, claude-sonnet-4-6"):
        check_model("claude-opus-5", ("claude-haiku-4-5", "claude-sonnet-4-6"), "research")


def test_cap_passes_calls_within_it() -> None:
    body = b'{"max_tokens": 100}'
    capped = cap_output({"max_tokens": 100}, body, cap=100, policy="reject", team="t")
    assert (capped.body, capped.max_tokens) == (body, 100)
    assert cap_output({"max_tokens": 5000}, body, cap=None, policy="reject", team="t").max_tokens == 5000
    assert cap_output({}, b"{}", cap=10, policy="clamp", team="t").max_tokens is None


def test_cap_rejects() -> None:
    with pytest.raises(OutputCapExceeded, match="max_tokens 5000 is above team t's output cap of 1000"):
        cap_output({"max_tokens": 5000}, b"", cap=1000, policy="reject", team="t")


def test_cap_clamps_and_keeps_the_rest_of_the_body() -> None:
    request: dict[str, Any] = {"model": "m", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}
    capped = cap_output(request, json.dumps(request).encode(), cap=1000, policy="clamp", team="t")
    assert capped.max_tokens == 1000
    assert json.loads(capped.body) == {**request, "max_tokens": 1000}


def test_clamp_lowers_a_thinking_budget_above_the_cap() -> None:
    request = {"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 16000}}
    capped = cap_output(request, b"", cap=8000, policy="clamp", team="t")
    assert json.loads(capped.body)["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    kept = cap_output(
        {"max_tokens": 32000, "thinking": {"type": "enabled", "budget_tokens": 2000}},
        b"",
        cap=8000,
        policy="clamp",
        team="t",
    )
    assert json.loads(kept.body)["thinking"]["budget_tokens"] == 2000


def test_clamp_refuses_when_thinking_cannot_fit() -> None:
    request = {"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2000}}
    with pytest.raises(OutputCapExceeded, match="leaves no room for extended thinking"):
        cap_output(request, b"", cap=1000, policy="clamp", team="t")


def test_input_bound_counts_images_and_tools() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 90_000}}
    url_image = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    request = {"messages": [{"role": "user", "content": [image, url_image, {"type": "text", "text": "hi"}]}]}
    assert input_token_bound(request, 100_000) == 100_000 - 90_000 + 2 * IMAGE_TOKEN_BOUND
    assert input_token_bound({"tools": [{"name": "x"}]}, 500) == 500 + TOOLS_TOKEN_BOUND
    assert input_token_bound({"tools": []}, 500) == 500


IMAGE_SHAPED = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 200_000}}
# Where the same shape is text to the model: every byte of it is billed as input.
NOT_AN_IMAGE: list[Any] = [
    lambda image: {"tools": [{"name": "t", "input_schema": {"type": "object", "properties": {"x": image}}}]},
    lambda image: {"tools": [{"name": "t", "input_schema": image}]},
    lambda image: {"metadata": {"user_id": "u", "extra": image}},
    lambda image: {"system": [{"type": "text", "text": "s", "citations": [image]}]},
    lambda image: {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": image}]}]},
    lambda image: {"messages": [{"role": "user", "content": [{"type": "text", "text": "t", "image": image}]}]},
    lambda image: {"messages": [{"role": "user", "content": "x", "attachments": [image]}]},
    lambda image: {"messages": [[image]]},
]


@pytest.mark.parametrize("place", NOT_AN_IMAGE)
def test_an_image_outside_message_content_is_text(place: Any) -> None:
    """An attacker's image-shaped data inside a tool's schema (or anywhere Anthropic reads as text) once shrank a
    200 KB body's bound to a few thousand tokens: a $0.05 budget let a $0.75 call through."""
    request = {"model": "claude-sonnet-4-6", "max_tokens": 10, **place(IMAGE_SHAPED)}
    size = len(json.dumps(request))
    assert input_token_bound(request, size) >= size


@given(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=3), st.booleans())
def test_real_images_count_at_their_bound(in_content: int, in_tool_results: int, decoy: bool) -> None:
    """Images in a message's content and in a tool result's content are bounded per image; decoys elsewhere add
    their bytes."""
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "B" * 5_000}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": [image] * in_tool_results}
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": [image] * in_content + [result]}],
        **({"metadata": {"extra": image}} if decoy else {}),
    }
    images = in_content + in_tool_results
    assert input_token_bound(request, 100_000) == 100_000 - images * 5_000 + images * IMAGE_TOKEN_BOUND


@pytest.mark.parametrize(
    "request_body, input_tokens, max_tokens, expected",
    [
        # Sonnet 4.6: 1,000 in at the 5m write rate $3.75 + 100 out at $15 (per MTok).
        pytest.param({}, 1000, 100, "0.00525", id="5m-write-rate"),
        # A 1h TTL anywhere: 1,000 at $6 + 100 at $15.
        pytest.param(
            {"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
            1000,
            100,
            "0.0075",
            id="1h-write-rate",
        ),
        # Three searches at $0.01 on top.
        pytest.param(
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
            1000,
            100,
            "0.03525",
            id="web-search-max-uses",
        ),
        # No max_uses: ten searches are held.
        pytest.param(
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 1000, 100, "0.10525", id="web-search"
        ),
        # US residency on a 4.6 model: ×1.1 on the tokens.
        pytest.param({"inference_geo": "us"}, 1000, 100, "0.005775", id="us-residency"),
        pytest.param({}, 1000, None, "0.00375", id="no-max-tokens"),
    ],
)
def test_estimate(request_body: dict[str, Any], input_tokens: int, max_tokens: int | None, expected: str) -> None:
    cost = estimate_cost(
        request_body, model="claude-sonnet-4-6", input_tokens=input_tokens, max_tokens=max_tokens, prices=PRICES, at=AT
    )
    assert cost == Decimal(expected)


def test_estimate_fast_mode_uses_fast_rates() -> None:
    # Opus 4.8 fast: $10 in (5m write 12.50) / $50 out: 1,000 × 12.50 + 100 × 50 per MTok.
    cost = estimate_cost(
        {"speed": "fast"}, model="claude-opus-4-8", input_tokens=1000, max_tokens=100, prices=PRICES, at=AT
    )
    assert cost == Decimal("0.0175")


def test_estimate_of_an_unpriced_model_is_none() -> None:
    assert estimate_cost({}, model="gpt-9", input_tokens=10, max_tokens=10, prices=PRICES, at=AT) is None
