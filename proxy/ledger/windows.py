"""Budget windows: a team, a key or an end user may have a daily, a weekly and a monthly allowance at once (besides
the shorthand budget, which may also be `total`). Each window is a budget counter of its own (`counters.py`), held
and settled like any other, so no window is ever overrun.

How they are stored, known only here: the shorthand `budget_usd` in `period` (what `--budget`/`--period` set,
and what views headline), plus one column per calendar window for the others. The column of the shorthand's own
period stays NULL, so every window has exactly one home whatever order the options came in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from proxy.types import PERIODS, UNSET, Counter, Period, Unset, Windows, usd

# The calendar windows that have a column of their own, and their columns' names.
WINDOW_PERIODS: tuple[Period, ...] = ("day", "week", "month")
WINDOW_COLUMNS: dict[Period, str] = {
    "day": "daily_budget_usd",
    "week": "weekly_budget_usd",
    "month": "monthly_budget_usd",
}
# How refusals, views and the CLI name a window.
WINDOW_NAMES: dict[Period, str] = {"day": "daily", "week": "weekly", "month": "monthly", "total": "total"}
WindowColumns = tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]  # shorthand, day, week, month


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowChange:
    """What an update says about a budget's windows: the shorthand (`budget`, `period`) and each calendar window
    (`windows`: None for "no limit in that window"). `UNSET` leaves a value as it is."""

    budget: Decimal | None | Unset = UNSET
    period: Period | Unset = UNSET
    windows: Mapping[Period, Decimal | None] | None = None

    def __post_init__(self) -> None:
        for amount in (self.budget, *(self.windows or {}).values()):
            if isinstance(amount, Decimal) and (amount.is_signed() or not amount.is_finite()):
                raise ValueError(f"budget must be a finite amount, not negative, got {amount}")
        if not isinstance(self.period, Unset) and self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {self.period!r}")
        for period in self.windows or {}:
            if period not in WINDOW_PERIODS:
                raise ValueError(f"a budget window is one of {', '.join(WINDOW_PERIODS)}, got {period!r}")

    @property
    def empty(self) -> bool:
        """Whether it changes nothing."""
        return isinstance(self.budget, Unset) and isinstance(self.period, Unset) and not self.windows


def windows_of(
    period: Period, budget: Decimal | None, daily: Decimal | None, weekly: Decimal | None, monthly: Decimal | None
) -> Windows:
    """A budget's windows from its stored columns."""
    found = dict(zip(WINDOW_PERIODS, (daily, weekly, monthly), strict=True)) | {period: budget}
    return {window: amount for window in PERIODS if (amount := found.get(window)) is not None}


def window_columns(windows: Windows, period: Period) -> WindowColumns:
    """The stored columns of a budget's windows: the shorthand's period in `budget_usd`, the others in theirs."""
    daily, weekly, monthly = (None if window == period else windows.get(window) for window in WINDOW_PERIODS)
    return windows.get(period), daily, weekly, monthly


def change_windows(windows: Windows, period: Period, change: WindowChange) -> tuple[Windows, Period]:
    """A budget's windows and shorthand period after `change`. `--budget` sets the shorthand's window and the window
    options set theirs; `--period` alone moves the shorthand budget to the new period (what it always did), unless
    a budget there already would be silently replaced."""
    new_period = period if isinstance(change.period, Unset) else change.period
    result = dict(windows)
    updates: dict[Period, Decimal | None] = dict(change.windows or {})
    if not isinstance(change.budget, Unset):
        if new_period in updates:
            raise ValueError(
                f"the budget per {new_period} is given twice (as the budget of period {new_period} and as the "
                f"{WINDOW_NAMES[new_period]} budget): give one"
            )
        updates[new_period] = change.budget
    for window, amount in updates.items():
        if amount is None:
            result.pop(window, None)
        else:
            result[window] = amount
    if new_period != period and isinstance(change.budget, Unset) and period in result:
        # Moved after the windows changed: a window removed in the same change frees its period.
        if new_period in result:
            raise ValueError(
                f"the budget per {period} cannot move to period {new_period}: there is a {WINDOW_NAMES[new_period]} "
                f"budget already. Give the budget with the period, or remove the {WINDOW_NAMES[new_period]} one first"
            )
        result[new_period] = result.pop(period)
    return {window: result[window] for window in PERIODS if window in result}, new_period


def counted(windows: Windows, period: Period) -> tuple[Period, ...]:
    """The windows whose spend is counted: every calendar window, with a budget or not, so a budget set later (or a
    call that was in flight when it was set) is counted from what was already spent; `total` when it is the
    shorthand's period or has a budget."""
    total: tuple[Period, ...] = ("total",) if period == "total" or "total" in windows else ()
    return (*WINDOW_PERIODS, *total)


def to_recount(before: Windows, before_period: Period, after: Windows, after_period: Period) -> tuple[Period, ...]:
    """The windows a change must count from the ledger's records: one counted only from now on, and one given a
    budget now (its counter may have started mid-period, in a release that did not count it)."""
    counted_before = counted(before, before_period)
    return tuple(
        period
        for period in counted(after, after_period)
        if period not in counted_before or (period in after and period not in before)
    )


def period_start(period: str, now: datetime) -> datetime | None:
    """Start of the current calendar period in UTC (weeks start Monday); None for `total`."""
    return calendar_start(period, now) if period in WINDOW_PERIODS else None


def period_end(period: str, start: datetime) -> datetime | None:
    """The end of the calendar period that starts at `start` (None for `total`)."""
    return calendar_end(period, start) if period in WINDOW_PERIODS else None


def calendar_start(period: str, now: datetime) -> datetime:
    """Start of the UTC day, week (from Monday) or month (`period`) `now` is in."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    return day - timedelta(days=day.weekday()) if period == "week" else day.replace(day=1)


def calendar_end(period: str, start: datetime) -> datetime:
    """The end of the UTC day, week or month that starts at `start`."""
    if period == "month":
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return start + timedelta(days=1 if period == "day" else 7)


def next_start(period: str, instant: datetime) -> datetime:
    """The first start of a day, week or month at or after `instant`."""
    start = calendar_start(period, instant)
    return start if start == instant else calendar_end(period, start)


def named(windows: Windows) -> dict[str, str | None]:
    """Windows as views and the audit trail show them: `{"daily": "10", "monthly": "100"}`."""
    return {WINDOW_NAMES[period]: usd(amount) for period, amount in windows.items()}


def reset_words(period: Period, end: datetime | None) -> str:
    """How a refusal names a window and when it resets: `daily; resets 2026-12-07T00:00:00Z`."""
    if end is None:
        return f"{WINDOW_NAMES[period]}; never resets"
    return f"{WINDOW_NAMES[period]}; resets {utc_instant(end)}"


def utc_instant(when: datetime) -> str:
    """An instant as refusals and their headers spell it, to the second in UTC: `2026-12-07T00:00:00Z`."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowView:
    """One budget window of a team, key or end user as views show it: its allowance, what is spent and held in it,
    what is left, and when it resets (None: `total`, never)."""

    period: Period
    budget_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal
    period_start: datetime
    resets_at: datetime | None

    @property
    def window(self) -> str:
        """The window's name: daily, weekly, monthly or total."""
        return WINDOW_NAMES[self.period]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; money as exact decimal strings."""
        return {
            "window": self.window,
            "period": self.period,
            "budget_usd": usd(self.budget_usd),
            "spent_usd": usd(self.spent_usd),
            "reserved_usd": usd(self.reserved_usd),
            "remaining_usd": usd(self.remaining_usd),
            "period_start": self.period_start.isoformat(),
            "resets_at": self.resets_at.isoformat() if self.resets_at else None,
        }


def window_views(counters: Iterable[Counter], spend: Mapping[str, tuple[Decimal, Decimal]]) -> tuple[WindowView, ...]:
    """The windows of budgeted counters, given their (spent, reserved) by scope (`counters.current_spend`)."""
    views = []
    for counter in counters:
        if counter.budget_usd is None:
            continue
        spent, reserved = spend.get(counter.scope, (Decimal(0), Decimal(0)))
        views.append(
            WindowView(
                period=counter.period,
                budget_usd=counter.budget_usd,
                spent_usd=spent,
                reserved_usd=reserved,
                remaining_usd=counter.budget_usd - spent - reserved,
                period_start=counter.period_start,
                resets_at=period_end(counter.period, counter.period_start),
            )
        )
    return tuple(views)
