"""Turn a response's `Usage` into exact dollars with the dated price table in `proxy/pricing/prices.toml`.

The table is data; the rules that apply it live here, each stated once with its source. "The pricing page"
below is https://docs.claude.com/en/docs/about-claude/pricing.
"""

from __future__ import annotations

import bisect
import logging
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow, localcontext
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.types import Cost, IterationUsage, PriceSource, Usage

# Web search is $10 per 1,000 searches on top of tokens; web fetch has no fee (the pricing page, "Web search").
WEB_SEARCH_USD = Decimal("0.01")
CELLS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "batch_input", "batch_output")
logger = logging.getLogger("spendgate")
SHIPPED_TABLE = "proxy/pricing/prices.toml"

_MODEL_KEYS = frozenset({*CELLS, "aliases", "residency_multiplier", "fast", "long_context"})
_HALF = Decimal("0.5")
_CACHE_RATES = {"cache_creation_5m_input_tokens": "cache_write_5m", "cache_creation_1h_input_tokens": "cache_write_1h"}
_FAST_SIDES = {cell: "output" if cell.endswith("output") else "input" for cell in CELLS}
# Money is never rounded: any arithmetic that would need rounding raises `decimal.Inexact` instead.
# Models warned about at most, per table: model ids can come from clients (worst-case estimates).
MAX_WARNED_MODELS = 1000
_DATED = re.compile(r"-\d{8}$")
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])


class PriceError(ValueError):
    """The shipped table or a `SPENDGATE_PRICES` file is invalid. The message names the file, key and value."""

    def __init__(self, path: str, problem: str, key: str = "", value: object = None) -> None:
        shown = "" if value is None else f" = {value if isinstance(value, int | Decimal) else repr(value)}"
        super().__init__(f"{path}: {key}{shown}: {problem}" if key else f"{path}: {problem}")
        self.path, self.key, self.value = path, key, value


class _Invalid(Exception):
    """A bad value found while reading one file; `PriceTable.load` adds the file name."""

    def __init__(self, problem: str, key: str = "", value: object = None) -> None:
        super().__init__(problem, key, value)


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
        discount included as `_token_cost` applies it."""
        if kind == "input_tokens":
            return self.batch_input if batch else self.input
        rate: Decimal = getattr(self, _CACHE_RATES[kind])
        return rate * _HALF if batch else rate


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


@dataclass(slots=True)
class _Draft:
    effective_from: datetime | None = None
    models: dict[str, ModelPrice] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Version:
    id: str
    effective_from: datetime
    models: dict[str, ModelPrice]
    index: dict[str, ModelPrice]  # every id and alias
    families: dict[str, str]


class PriceTable:
    """The dated price versions in force: the shipped table plus an optional `SPENDGATE_PRICES` file.

    ```python
    table = PriceTable.load()
    cost = table.price(model="claude-sonnet-4-6", usage=Usage(input_tokens=100_000, output_tokens=10_000), at=now)
    assert cost.cost_usd == Decimal("0.45")
    ```
    """

    def __init__(self, versions: list[_Version]) -> None:
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
        drafts: dict[str, _Draft] = {}
        for name, text in sources:
            # Checked file by file, so an error is blamed on the file that introduced it.
            try:
                versions = _resolve(_merge(drafts, text))
            except _Invalid as exc:
                raise PriceError(name, *exc.args) from None
        return cls(versions)

    def version_at(self, at: datetime) -> str:
        """The id of the version in force at `at`; a naive `at` is taken as UTC."""
        return self._version(at).id

    def lists(self, model: str) -> bool:
        """Whether some version lists `model` by its exact id or an alias (neither a family fallback nor a dated
        variant counts: any client can invent those)."""
        return model in self._listed

    def lookup(self, model: str, at: datetime) -> tuple[ModelPrice, PriceSource] | None:
        """The price of `model` at `at` and where it came from: its id or alias (`"table"`), else the newest
        model of the family its name contains (`"family"`), else `None`."""
        return _lookup(self._version(at), model)

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
        with localcontext(_EXACT):
            for part_model, tokens in parts:
                found = _lookup(version, part_model)
                if found is None:
                    self._say_once(part_model, None)
                    return Cost(cost_usd=None, price_version=version.id, price_source="unpriced")
                total += _token_cost(found[0], tokens, usage)
                if found[1] == "family":
                    self._say_once(part_model, found[0].model)
                    source = "family"
            # The search fee is not a token category, so neither the batch discount nor data residency
            # touches it; the pricing page states neither.
            total += usage.web_search_requests * WEB_SEARCH_USD
            return Cost(cost_usd=_plain(total), price_version=version.id, price_source=source)

    def describe(self, *, model: str | None, at: datetime) -> str:
        """Human text for `spendgate prices [--model M]`: the version in force and its per-MTok cells."""
        version = self._version(at)
        lines = [f"price version {version.id} (from {version.effective_from.isoformat()}), USD per million tokens"]
        prices = sorted(version.models.values(), key=lambda price: price.model)
        if model is not None:
            found = _lookup(version, model)
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
        found = _lookup(version, model) if model is not None else None
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

    def _version(self, at: datetime) -> _Version:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        # The first version also prices calls from before its date.
        return self._versions[max(bisect.bisect_right(self._starts, at) - 1, 0)]


def _lookup(version: _Version, model: str) -> tuple[ModelPrice, PriceSource] | None:
    price = version.index.get(model) or version.index.get(undated(model))
    if price is not None:
        # A dated snapshot (`claude-opus-4-6-20260205`) is its listed model, never its family's newest.
        return price, "table"
    # An unlisted id of a known family is priced, and flagged, rather than recorded as $0.
    for family, newest in version.families.items():
        if family in model:
            return version.index[newest], "family"
    return None


def undated(model: str) -> str:
    """A model id without its snapshot date suffix (`-YYYYMMDD`), as the table lists models."""
    return _DATED.sub("", model)


def _token_cost(price: ModelPrice, tokens: Usage | IterationUsage, usage: Usage) -> Decimal:
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
    # Batch is 50% off every token kind, cache multipliers stacking on top (the pricing page, "Batch processing").
    # Priority Tier has no public per-token price, so "priority" falls through to standard rates
    # (https://docs.claude.com/en/api/service-tiers).
    if usage.service_tier == "batch":
        cost = tokens.input_tokens * rates.batch_input + tokens.output_tokens * rates.batch_output + cache * _HALF
    else:
        cost = tokens.input_tokens * rates.input + tokens.output_tokens * rates.output + cache
    # Data residency: inference_geo "us" is 1.1x on all token categories, for models that carry a multiplier
    # (https://docs.claude.com/en/docs/build-with-claude/data-residency).
    if usage.inference_geo == "us":
        cost *= price.residency_multiplier
    return cost.scaleb(-6)  # cells are per million tokens


def _plain(amount: Decimal) -> Decimal:
    """`amount` with every significant digit and no exponent noise: 0.4500 → 0.45, 1.2E+1 → 12."""
    amount = amount.normalize(_EXACT)
    return amount.quantize(Decimal(1), context=_EXACT) if amount == amount.to_integral_value() else amount


def _rates_json(rates: Rates) -> dict[str, str]:
    return {name: format(getattr(rates, name), "f") for name in Rates.__dataclass_fields__}


def _cells(rates: Rates) -> str:
    return (
        f"input {rates.input}  output {rates.output}  5m write {rates.cache_write_5m}  "
        f"1h write {rates.cache_write_1h}  cache read {rates.cache_read}  "
        f"batch {rates.batch_input} / {rates.batch_output}"
    )


def _merge(drafts: dict[str, _Draft], text: str) -> dict[str, _Draft]:
    """Parse one table file and apply its versions to `drafts` by id."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)  # TOML floats as exact decimals
    except tomllib.TOMLDecodeError as exc:
        raise _Invalid(f"not valid TOML: {exc}") from exc
    versions = _table("", doc, {"version"}).get("version")
    if not isinstance(versions, list) or not versions:
        raise _Invalid("expected one or more [[version]] tables", "version", versions)
    seen: set[str] = set()
    for n, raw in enumerate(versions):
        version = _table(f"version[{n}]", raw, {"id", "effective_from", "models", "families"})
        vid = version.get("id")
        if not isinstance(vid, str) or not vid or vid in seen:
            raise _Invalid("must be a string naming a version once per file", f"version[{n}].id", vid)
        seen.add(vid)
        key, draft = f"version[{vid}]", drafts.setdefault(vid, _Draft())
        if "effective_from" in version:
            when = version["effective_from"]
            if not isinstance(when, datetime) or when.tzinfo is None:
                raise _Invalid(
                    "must be a date-time with an offset, e.g. 2026-09-01T00:00:00Z", f"{key}.effective_from", when
                )
            draft.effective_from = when
        for model, entry in _table(f"{key}.models", version.get("models", {})).items():
            draft.models[model] = _model(f"{key}.models.{model}", model, entry)
        for family, newest in _table(f"{key}.families", version.get("families", {})).items():
            if not isinstance(newest, str):
                raise _Invalid("must be a model id", f"{key}.families.{family}", newest)
            draft.families[family] = newest
    return drafts


def _resolve(drafts: dict[str, _Draft]) -> list[_Version]:
    """Order the versions by date, each inheriting the models and families of the one before it."""
    starts: dict[datetime, str] = {}
    for vid, draft in drafts.items():
        if draft.effective_from is None:
            raise _Invalid("is required for a new version", f"version[{vid}].effective_from")
        if draft.effective_from in starts:
            problem = f"is also when version {starts[draft.effective_from]} starts"
            raise _Invalid(problem, f"version[{vid}].effective_from", draft.effective_from)
        starts[draft.effective_from] = vid
    models: dict[str, ModelPrice] = {}
    families: dict[str, str] = {}
    versions = []
    for start, vid in sorted(starts.items()):
        models, families = {**models, **drafts[vid].models}, {**families, **drafts[vid].families}
        index: dict[str, ModelPrice] = {}
        for price in models.values():
            for name in (price.model, *price.aliases):
                if index.setdefault(name, price) is not price:
                    raise _Invalid(f"already names {index[name].model}", f"version[{vid}].models.{price.model}", name)
        for family, newest in families.items():
            if newest not in index:
                raise _Invalid("is not a model in this version", f"version[{vid}].families.{family}", newest)
        versions.append(_Version(vid, start, models, index, families))
    return versions


def _model(key: str, model: str, raw: object) -> ModelPrice:
    entry = _table(key, raw, _MODEL_KEYS)
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(alias, str) and alias for alias in aliases):
        raise _Invalid("must be a list of model ids", f"{key}.aliases", aliases)
    standard = _rates(key, entry)
    tier = None
    if "long_context" in entry:
        raw_tier = _table(f"{key}.long_context", entry["long_context"], {"threshold", *CELLS})
        threshold = raw_tier.get("threshold")
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise _Invalid("must be a token count", f"{key}.long_context.threshold", threshold)
        tier = ContextTier(threshold=threshold, rates=_rates(f"{key}.long_context", raw_tier))
    return ModelPrice(
        model=model,
        aliases=tuple(aliases),
        standard=standard,
        fast=_fast(f"{key}.fast", standard, entry["fast"]) if "fast" in entry else None,
        long_context=tier,
        residency_multiplier=_number(f"{key}.residency_multiplier", entry.get("residency_multiplier", 1)),
    )


def _fast(key: str, standard: Rates, raw: object) -> Rates:
    """Fast-mode rates from the published input and output; the other cells keep their ratio to the standard
    input (cache, batch input) or output (batch output), since cache multipliers stack with fast mode
    (https://docs.claude.com/en/docs/build-with-claude/fast-mode)."""
    table = _table(key, raw, {"input", "output"})
    fast = {side: _number(f"{key}.{side}", table.get(side)) for side in ("input", "output")}
    try:
        with localcontext(_EXACT):
            return Rates(
                **{
                    cell: _plain(getattr(standard, cell) * fast[side] / getattr(standard, side))
                    for cell, side in _FAST_SIDES.items()
                }
            )
    except (Inexact, InvalidOperation, DivisionByZero) as exc:
        raise _Invalid("cannot scale the standard cells exactly to these rates", key, table) from exc


def _rates(key: str, table: dict[str, Any]) -> Rates:
    return Rates(**{cell: _number(f"{key}.{cell}", table.get(cell)) for cell in CELLS})


def _number(key: str, value: object) -> Decimal:
    if value is None:
        raise _Invalid("is required", key)
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or not Decimal(value).is_finite() or value < 0:
        raise _Invalid("must be a non-negative number such as 3 or 3.75", key, value)
    return Decimal(value)


def _table(key: str, value: object, allowed: Collection[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid("must be a table", key, value)
    unknown = sorted(value.keys() - set(allowed)) if allowed is not None else []
    if unknown:
        raise _Invalid(
            f"unknown key; expected one of {', '.join(sorted(allowed or ()))}", f"{key}.{unknown[0]}".lstrip(".")
        )
    return value
