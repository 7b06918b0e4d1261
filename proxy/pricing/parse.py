"""Reading price table files: TOML checked key by key, versions patched by id across files and ordered by date."""

from __future__ import annotations

import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, DivisionByZero, Inexact, InvalidOperation, localcontext
from typing import Any

from proxy.pricing.cost import EXACT, plain
from proxy.pricing.versions import CELLS, ContextTier, ModelPrice, Rates, Version

_MODEL_KEYS = frozenset({*CELLS, "aliases", "residency_multiplier", "fast", "long_context"})
_FAST_SIDES = {cell: "output" if cell.endswith("output") else "input" for cell in CELLS}


class Invalid(Exception):
    """A bad value found while reading one file; `PriceTable.load` adds the file name."""

    def __init__(self, problem: str, key: str = "", value: object = None) -> None:
        super().__init__(problem, key, value)


@dataclass(slots=True)
class Draft:
    """One version as the files read so far state it (a later file may patch it)."""

    effective_from: datetime | None = None
    models: dict[str, ModelPrice] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)


def merge(drafts: dict[str, Draft], text: str) -> dict[str, Draft]:
    """Parse one table file and apply its versions to `drafts` by id."""
    try:
        doc = tomllib.loads(text, parse_float=Decimal)  # TOML floats as exact decimals
    except tomllib.TOMLDecodeError as exc:
        raise Invalid(f"not valid TOML: {exc}") from exc
    versions = _table("", doc, {"version"}).get("version")
    if not isinstance(versions, list) or not versions:
        raise Invalid("expected one or more [[version]] tables", "version", versions)
    seen: set[str] = set()
    for n, raw in enumerate(versions):
        version = _table(f"version[{n}]", raw, {"id", "effective_from", "models", "families"})
        vid = version.get("id")
        if not isinstance(vid, str) or not vid or vid in seen:
            raise Invalid("must be a string naming a version once per file", f"version[{n}].id", vid)
        seen.add(vid)
        key, draft = f"version[{vid}]", drafts.setdefault(vid, Draft())
        if "effective_from" in version:
            when = version["effective_from"]
            if not isinstance(when, datetime) or when.tzinfo is None:
                raise Invalid(
                    "must be a date-time with an offset, e.g. 2026-09-01T00:00:00Z", f"{key}.effective_from", when
                )
            draft.effective_from = when
        for model, entry in _table(f"{key}.models", version.get("models", {})).items():
            draft.models[model] = _model(f"{key}.models.{model}", model, entry)
        for family, newest in _table(f"{key}.families", version.get("families", {})).items():
            if not isinstance(newest, str):
                raise Invalid("must be a model id", f"{key}.families.{family}", newest)
            draft.families[family] = newest
    return drafts


def resolve(drafts: dict[str, Draft]) -> list[Version]:
    """Order the versions by date, each inheriting the models and families of the one before it."""
    starts: dict[datetime, str] = {}
    for vid, draft in drafts.items():
        if draft.effective_from is None:
            raise Invalid("is required for a new version", f"version[{vid}].effective_from")
        if draft.effective_from in starts:
            problem = f"is also when version {starts[draft.effective_from]} starts"
            raise Invalid(problem, f"version[{vid}].effective_from", draft.effective_from)
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
                    raise Invalid(f"already names {index[name].model}", f"version[{vid}].models.{price.model}", name)
        for family, newest in families.items():
            if newest not in index:
                raise Invalid("is not a model in this version", f"version[{vid}].families.{family}", newest)
        versions.append(Version(vid, start, models, index, families))
    return versions


def _model(key: str, model: str, raw: object) -> ModelPrice:
    entry = _table(key, raw, _MODEL_KEYS)
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(alias, str) and alias for alias in aliases):
        raise Invalid("must be a list of model ids", f"{key}.aliases", aliases)
    standard = _rates(key, entry)
    tier = None
    if "long_context" in entry:
        raw_tier = _table(f"{key}.long_context", entry["long_context"], {"threshold", *CELLS})
        threshold = raw_tier.get("threshold")
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise Invalid("must be a token count", f"{key}.long_context.threshold", threshold)
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
        with localcontext(EXACT):
            return Rates(
                **{
                    cell: plain(getattr(standard, cell) * fast[side] / getattr(standard, side))
                    for cell, side in _FAST_SIDES.items()
                }
            )
    except (Inexact, InvalidOperation, DivisionByZero) as exc:
        raise Invalid("cannot scale the standard cells exactly to these rates", key, table) from exc


def _rates(key: str, table: dict[str, Any]) -> Rates:
    return Rates(**{cell: _number(f"{key}.{cell}", table.get(cell)) for cell in CELLS})


def _number(key: str, value: object) -> Decimal:
    if value is None:
        raise Invalid("is required", key)
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or not Decimal(value).is_finite() or value < 0:
        raise Invalid("must be a non-negative number such as 3 or 3.75", key, value)
    return Decimal(value)


def _table(key: str, value: object, allowed: Collection[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid("must be a table", key, value)
    unknown = sorted(value.keys() - set(allowed)) if allowed is not None else []
    if unknown:
        raise Invalid(
            f"unknown key; expected one of {', '.join(sorted(allowed or ()))}", f"{key}.{unknown[0]}".lstrip(".")
        )
    return value
