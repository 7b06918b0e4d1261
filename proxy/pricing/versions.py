"""One dated version of the price table: each model's cells, the rules that choose which cells price a call, and
the price a model id gets in that version.

"The pricing page" below is https://docs.claude.com/en/docs/about-claude/pricing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from proxy.types import PriceSource

CELLS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "batch_input", "batch_output")
# Batch is 50% off every token kind, cache multipliers stacking on top (the pricing page, "Batch processing").
BATCH_FACTOR = Decimal("0.5")

_CACHE_RATES = {"cache_creation_5m_input_tokens": "cache_write_5m", "cache_creation_1h_input_tokens": "cache_write_1h"}
_DATED = re.compile(r"-\d{8}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rates:
    """One set of prices in USD per million tokens, one cell per token kind."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    batch_input: Decimal
    batch_output: Decimal

    def input_rate(self, kind: str, *, batch: bool) -> Decimal:
        """What one input-side token of `kind` (a `Usage` field: plain input or a cache write) costs, batch
        discount included as `proxy.pricing.cost.token_cost` applies it."""
        if kind == "input_tokens":
            return self.batch_input if batch else self.input
        rate: Decimal = getattr(self, _CACHE_RATES[kind])
        return rate * BATCH_FACTOR if batch else rate


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextTier:
    """Rates for every token of a call whose input + cache writes + cache reads exceed `threshold`."""

    threshold: int
    rates: Rates


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPrice:
    """How one model is priced in one table version; every cell is USD per million tokens."""

    model: str
    aliases: tuple[str, ...] = ()
    standard: Rates
    fast: Rates | None = None
    long_context: ContextTier | None = None
    residency_multiplier: Decimal = Decimal(1)

    def rates(self, *, fast: bool, context_tokens: int) -> Rates:
        """The rates that price a call, given its speed and its input-side token count."""
        # Fast mode "applies across the full context window, including requests over 200k"
        # (https://docs.claude.com/en/docs/build-with-claude/fast-mode); unpublished means standard rates.
        if fast and self.fast is not None:
            return self.fast
        # Past the threshold *all* tokens take the tier's rates; exactly the threshold is not past it
        # (the pricing page, "Long context pricing": "If your request exceeds 200K input tokens").
        if self.long_context is not None and context_tokens > self.long_context.threshold:
            return self.long_context.rates
        return self.standard


@dataclass(frozen=True, slots=True)
class Version:
    """One dated version of the table, with the models and families of the versions before it."""

    id: str
    effective_from: datetime
    models: dict[str, ModelPrice]
    index: dict[str, ModelPrice]  # every id and alias
    families: dict[str, str]

    def lookup(self, model: str) -> tuple[ModelPrice, PriceSource] | None:
        """The price of `model` in this version and where it came from: its id or alias (`"table"`), else the
        newest model of the family its name contains (`"family"`), else `None`."""
        price = self.index.get(model) or self.index.get(undated(model))
        if price is not None:
            # A dated snapshot (`claude-opus-4-6-20260205`) is its listed model, never its family's newest.
            return price, "table"
        # An unlisted id of a known family is priced, and flagged, rather than recorded as $0.
        for family, newest in self.families.items():
            if family in model:
                return self.index[newest], "family"
        return None


def undated(model: str) -> str:
    """A model id without its snapshot date suffix (`-YYYYMMDD`), as the table lists models."""
    return _DATED.sub("", model)
