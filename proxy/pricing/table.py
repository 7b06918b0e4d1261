"""Turn a response's `Usage` into exact dollars with the dated price table in `proxy/pricing/prices.toml`.

The table is data: `parse` reads it, `versions` holds each version and its model rules, `cost` prices tokens at
one model's cells. Here: the versions in force, the price of a whole call, and the table shown to operators.
"The pricing page" below is https://docs.claude.com/en/docs/about-claude/pricing.
"""

from __future__ import annotations

import bisect
import logging
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.pricing.cost import EXACT, WEB_SEARCH_USD, plain, token_cost
from proxy.pricing.parse import Draft, Invalid, merge, resolve
from proxy.pricing.versions import ModelPrice, Rates, Version
from proxy.types import Cost, IterationUsage, PriceSource, Usage

logger = logging.getLogger("spendgate")
SHIPPED_TABLE = "proxy/pricing/prices.toml"
# Models warned about at most, per table: model ids can come from clients (worst-case estimates).
MAX_WARNED_MODELS = 1000


class PriceError(ValueError):
    """The shipped table or a `SPENDGATE_PRICES` file is invalid. The message names the file, key and value."""

    def __init__(self, path: str, problem: str, key: str = "", value: object = None) -> None:
        shown = "" if value is None else f" = {value if isinstance(value, int | Decimal) else repr(value)}"
        super().__init__(f"{path}: {key}{shown}: {problem}" if key else f"{path}: {problem}")
        self.path, self.key, self.value = path, key, value


class PriceTable:
    """The dated price versions in force: the shipped table plus an optional `SPENDGATE_PRICES` file.

    ```python
    table = PriceTable.load()
    cost = table.price(model="claude-sonnet-4-6", usage=Usage(input_tokens=100_000, output_tokens=10_000), at=now)
    assert cost.cost_usd == Decimal("0.45")
    ```
    """

    def __init__(self, versions: list[Version]) -> None:
        self._versions = versions
        self._starts = [version.effective_from for version in versions]
        self._listed = frozenset(name for version in versions for name in version.index)
        # Models already warned about (family-priced or unpriced), so each is logged once per process.
        self._warned: set[str] = set()

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """Load the shipped table, then apply `override` (the `SPENDGATE_PRICES` file) if given.

        A version in `override` whose id is shipped patches that version; a new id adds a dated version.
        Raises `PriceError` naming the file, key and bad value.
        """
        sources = [
            (SHIPPED_TABLE, resources.files("proxy.pricing").joinpath("prices.toml").read_text(encoding="utf-8"))
        ]
        if override is not None:
            try:
                sources.append((str(override), override.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise PriceError(str(override), f"cannot read the price file: {exc}") from exc
        drafts: dict[str, Draft] = {}
        for name, text in sources:
            # Checked file by file, so an error is blamed on the file that introduced it.
            try:
                versions = resolve(merge(drafts, text))
            except Invalid as exc:
                raise PriceError(name, *exc.args) from None
        return cls(versions)

    def version_at(self, at: datetime) -> str:
        """The id of the version in force at `at`; a naive `at` is taken as UTC."""
        return self._version(at).id

    def lists(self, model: str) -> bool:
        """Whether some version lists `model` by its exact id or an alias (neither a family fallback nor a dated
        variant counts: any client can invent those)."""
        return model in self._listed

    def models(self, at: datetime) -> list[str]:
        """The ids of the models the version in force at `at` prices (aliases left out), sorted."""
        return sorted(self._version(at).models)

    def lookup(self, model: str, at: datetime) -> tuple[ModelPrice, PriceSource] | None:
        """The price of `model` at `at` and where it came from: its id or alias (`"table"`), else the newest
        model of the family its name contains (`"family"`), else `None`."""
        return self._version(at).lookup(model)

    def price(self, *, model: str, usage: Usage, at: datetime) -> Cost:
        """The exact cost of one call that started at `at`, served by `model`.

        Never raises for an unknown model: the cost is `None` and the source `"unpriced"`.
        """
        version = self._version(at)
        # Compaction iterations are not in the top-level counts; the sum over `usage.iterations` is what is
        # billed, each at its own model (https://docs.claude.com/en/docs/build-with-claude/compaction).
        parts: list[tuple[str, Usage | IterationUsage]] = (
            [(iteration.model or model, iteration) for iteration in usage.iterations]
            if usage.iterations
            else [(model, usage)]
        )
        total = Decimal(0)
        source: PriceSource = "table"
        with localcontext(EXACT):
            for part_model, tokens in parts:
                found = version.lookup(part_model)
                if found is None:
                    self._say_once(part_model, None)
                    return Cost(cost_usd=None, price_version=version.id, price_source="unpriced")
                total += token_cost(found[0], tokens, usage)
                if found[1] == "family":
                    self._say_once(part_model, found[0].model)
                    source = "family"
            # The search fee is not a token category, so neither the batch discount nor data residency
            # touches it; the pricing page states neither.
            total += usage.web_search_requests * WEB_SEARCH_USD
            return Cost(cost_usd=plain(total), price_version=version.id, price_source=source)

    def describe(self, *, model: str | None, at: datetime) -> str:
        """Human text for `spendgate prices [--model M]`: the version in force and its per-MTok cells."""
        version = self._version(at)
        lines = [f"price version {version.id} (from {version.effective_from.isoformat()}), USD per million tokens"]
        prices = sorted(version.models.values(), key=lambda price: price.model)
        if model is not None:
            found = version.lookup(model)
            if found is None:
                return "\n".join([*lines, f"{model}: no price; add one with a SPENDGATE_PRICES file"])
            if found[1] == "family":
                lines.append(f"{model}: not in the table, priced as its family's {found[0].model}")
            prices = [found[0]]
        for price in prices:
            lines.append(price.model + (f" (aliases: {', '.join(price.aliases)})" if price.aliases else ""))
            lines.append(f"  standard        {_cells(price.standard)}")
            if price.long_context is not None:
                lines.append(f"  over {price.long_context.threshold:<10} {_cells(price.long_context.rates)}")
            if price.fast is not None:
                lines.append(f"  fast            {_cells(price.fast)}")
            if price.residency_multiplier != 1:
                lines.append(f'  inference_geo "us": x{price.residency_multiplier}')
        return "\n".join(lines)

    def to_json(self, *, model: str | None, at: datetime) -> dict[str, Any]:
        """`spendgate prices --format json`: the version in force and its models' cells as exact decimal text
        (one model, as `describe` finds it, when `model` is given; `source` says how it was found)."""
        version = self._version(at)
        found = version.lookup(model) if model is not None else None
        if model is None:
            chosen = [(price, "table") for price in sorted(version.models.values(), key=lambda price: price.model)]
        else:
            chosen = [] if found is None else [found]
        return {
            "version": version.id,
            "effective_from": version.effective_from.isoformat(),
            "unit": "USD per million tokens",
            "models": [
                {
                    "model": price.model,
                    "aliases": list(price.aliases),
                    "source": source,
                    "standard": _rates_json(price.standard),
                    "fast": None if price.fast is None else _rates_json(price.fast),
                    "long_context": None
                    if price.long_context is None
                    else {"threshold": price.long_context.threshold, **_rates_json(price.long_context.rates)},
                    "residency_multiplier": format(price.residency_multiplier, "f"),
                }
                for price, source in chosen
            ],
        }

    def _say_once(self, model: str, family_model: str | None) -> None:
        """Warn, once per model and table, that a model is priced by its family or not at all: the table is stale
        (the calls are also counted in metrics and reports)."""
        if model in self._warned or len(self._warned) >= MAX_WARNED_MODELS:
            return
        self._warned.add(model)
        if family_model is None:
            logger.warning(
                "model %r has no price in the table: its calls are recorded with cost null (price_source unpriced); "
                "add it with a SPENDGATE_PRICES file",
                model[:200],
            )
        else:
            logger.warning(
                "model %r is not in the price table: priced as its family's %s (price_source family), which may be "
                "wrong; add it with a SPENDGATE_PRICES file",
                model[:200],
                family_model,
            )

    def _version(self, at: datetime) -> Version:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        # The first version also prices calls from before its date.
        return self._versions[max(bisect.bisect_right(self._starts, at) - 1, 0)]


def _rates_json(rates: Rates) -> dict[str, str]:
    return {name: format(getattr(rates, name), "f") for name in Rates.__dataclass_fields__}


def _cells(rates: Rates) -> str:
    return (
        f"input {rates.input}  output {rates.output}  5m write {rates.cache_write_5m}  "
        f"1h write {rates.cache_write_1h}  cache read {rates.cache_read}  "
        f"batch {rates.batch_input} / {rates.batch_output}"
    )
