"""Option values as several commands take them: amounts, counts, instants and limits that may be cleared."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.cli.errors import UsageError
from proxy.types import Period, Unset, parse_instant

# Accepted by `teams update` to remove a limit rather than leave it unchanged.
CLEAR_WORDS = ("none", "unlimited", "all")
RATE_OPTIONS = ("rpm", "itpm", "otpm")


def given(value: str | None, parse: Callable[[str], Any]) -> Any:
    """An option that may clear a limit: not given (`UNSET`), 'none' (no limit), or `parse`d."""
    from proxy.types import UNSET

    if value is None:
        return UNSET
    if value.lower() in CLEAR_WORDS:
        return None
    return parse(value)


def windows_given(args: Any, prefix: str = "") -> dict[Period, Decimal | None] | None:
    """The budget windows `--daily-budget` & co. (after `prefix`) set: amounts, None to remove one; None if none
    was given."""
    from proxy.ledger.windows import WINDOW_NAMES, WINDOW_PERIODS

    found = {}
    for period in WINDOW_PERIODS:
        value = given(getattr(args, f"{prefix}{WINDOW_NAMES[period]}_budget"), money)
        if not isinstance(value, Unset):
            found[period] = value
    return found or None


def money(text: str) -> Decimal:
    """An amount in USD: a finite, non-negative decimal."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{text!r} is not an amount in USD (e.g. 250 or 12.50)") from None
    if not value.is_finite() or value < 0:
        raise UsageError(f"{text!r} is not an amount in USD (e.g. 250 or 12.50)")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"{text!r} is not a positive whole number")
    return int(text)


def instant(text: str | None) -> datetime | None:
    """An optional ISO 8601 instant (`--since`, `--until`)."""
    return None if text is None else parse_instant(text)
