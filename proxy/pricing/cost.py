"""The exact dollars of one call's tokens at one model's price: the pricing page's rules, each stated once with
its source, in decimal arithmetic that never rounds.

"The pricing page" below is https://docs.claude.com/en/docs/about-claude/pricing.
"""

from __future__ import annotations

from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow

from proxy.pricing.versions import BATCH_FACTOR, ModelPrice
from proxy.types import IterationUsage, Usage

# Web search is $10 per 1,000 searches on top of tokens; web fetch has no fee (the pricing page, "Web search").
WEB_SEARCH_USD = Decimal("0.01")
# Money is never rounded: any arithmetic that would need rounding raises `decimal.Inexact` instead.
EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])


def token_cost(price: ModelPrice, tokens: Usage | IterationUsage, usage: Usage) -> Decimal:
    """What `tokens` (a call's usage, or one of its compaction iterations) cost at `price`, with the speed, service
    tier and data residency of the call's `usage`; to be run under `EXACT`."""
    # "The 200K threshold is based solely on input tokens (including cache reads/writes)" (the pricing page).
    context = (
        tokens.input_tokens
        + tokens.cache_creation_5m_input_tokens
        + tokens.cache_creation_1h_input_tokens
        + tokens.cache_read_input_tokens
    )
    rates = price.rates(fast=usage.speed == "fast", context_tokens=context)
    cache = (
        tokens.cache_creation_5m_input_tokens * rates.cache_write_5m
        + tokens.cache_creation_1h_input_tokens * rates.cache_write_1h
        + tokens.cache_read_input_tokens * rates.cache_read
    )
    # Priority Tier has no public per-token price, so "priority" falls through to standard rates
    # (https://docs.claude.com/en/api/service-tiers).
    if usage.service_tier == "batch":
        cost = (
            tokens.input_tokens * rates.batch_input + tokens.output_tokens * rates.batch_output + cache * BATCH_FACTOR
        )
    else:
        cost = tokens.input_tokens * rates.input + tokens.output_tokens * rates.output + cache
    # Data residency: inference_geo "us" is 1.1x on all token categories, for models that carry a multiplier
    # (https://docs.claude.com/en/docs/build-with-claude/data-residency).
    if usage.inference_geo == "us":
        cost *= price.residency_multiplier
    return cost.scaleb(-6)  # cells are per million tokens


def plain(amount: Decimal) -> Decimal:
    """`amount` with every significant digit and no exponent noise: 0.4500 → 0.45, 1.2E+1 → 12."""
    amount = amount.normalize(EXACT)
    return amount.quantize(Decimal(1), context=EXACT) if amount == amount.to_integral_value() else amount
