"""Our price table against an independent, maintained price database (genai-prices), cell by cell.

Every model both know is compared at today's prices: input, output, both cache writes, cache reads, and the
long-context tier. A disagreement fails the test unless it is listed in `EXCEPTIONS` with its source, so the
table cannot drift silently from what others read off Anthropic's pricing page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import data_snapshot

from proxy.pricing.table import PriceTable
from proxy.pricing.versions import Rates

NOW = datetime(2026, 11, 30, tzinfo=UTC)
# (model, cell): why our value stands, and the source that says so.
_SONNET_45_TIER = (
    "the 1M-context beta of Sonnet 4 and 4.5, and its premium over 200K, ended on 2026-04-30 (pricing page, "
    "long-context section, 2026-03 and 2026-09 snapshots; prices.toml version 2026-04-30); genai-prices keeps it"
)
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("claude-sonnet-4-5-20250929", f"{cell} over 200000"): _SONNET_45_TIER
    for cell in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
}
CELLS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_write_5m": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "cache_read": "cache_read_mtok",
}
TABLE = PriceTable.load()
_FOUND = data_snapshot.find_provider_by_id(data_snapshot.get_snapshot().providers, "anthropic")
assert _FOUND is not None
ANTHROPIC = _FOUND


def theirs(model: str) -> Any:
    """genai-prices' entry for `model`, if it knows it."""
    return next((entry for entry in ANTHROPIC.models if entry.is_match(model)), None)


def ours() -> list[tuple[str, Any]]:
    """Every model of the version in force now."""
    version = TABLE._version(NOW)
    return sorted(version.models.items())


def cells(rates: Rates) -> dict[str, Decimal]:
    return {cell: getattr(rates, cell) for cell in CELLS}


@pytest.mark.parametrize("model, price", [pytest.param(m, p, id=m) for m, p in ours() if theirs(m) is not None])
def test_every_cell_agrees_with_genai_prices(model: str, price: Any) -> None:
    their_prices = theirs(model).get_prices(NOW)
    disagreements: list[tuple[str, Decimal | None, Any]] = []
    long_context = price.long_context
    for cell, field in CELLS.items():
        value = getattr(their_prices, field)
        if value is None:
            continue
        tiers = getattr(value, "tiers", None)
        base = value.base if tiers is not None else value
        if Decimal(base) != cells(price.standard)[cell]:
            disagreements.append((cell, cells(price.standard)[cell], base))
        for tier in tiers or ():
            if long_context is None or long_context.threshold != tier.start:
                disagreements.append((f"{cell} over {tier.start}", None, tier.price))
            elif cells(long_context.rates)[cell] != Decimal(tier.price):
                disagreements.append((f"{cell} over {tier.start}", cells(long_context.rates)[cell], tier.price))
        if not tiers and long_context is not None and cell != "cache_write_1h":
            # Our premium tier: flat pricing there is a disagreement (a tier they do not have).
            disagreements.append((f"{cell} over {long_context.threshold}", cells(long_context.rates)[cell], None))
    unexplained = [d for d in disagreements if (model, d[0]) not in EXCEPTIONS]
    assert unexplained == [], f"{model}: (cell, ours, genai-prices)"


def test_the_comparison_covers_the_current_models() -> None:
    compared = [model for model, _ in ours() if theirs(model) is not None]
    assert {"claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5", "claude-fable-5-2", "claude-opus-4-7"} <= set(
        compared
    )
    # Every exception names a model and cell the comparison reaches, and says why.
    assert all(model in compared and reason for (model, _), reason in EXCEPTIONS.items())
