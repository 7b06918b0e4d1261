"""When a budget runs out: the recent daily burn rate, projected to the end of the period.

The rate is a weighted mean of the last `WINDOW_DAYS` days of spend (today counted for the part of it that has
passed), each day weighing half as much as the day after it every `HALF_LIFE_DAYS`: recent days dominate, so a
team that just started an expensive job is flagged within a day, while one quiet day does not hide a trend. The
uncertainty is the weighted standard deviation of those days: the forecast is given as the rate ± one deviation,
and the run-out date as the range those two rates give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal

WINDOW_DAYS = 7
HALF_LIFE_DAYS = 2.0
DAY = timedelta(days=1)
ZERO = Decimal(0)
MICRO_USD = Decimal("0.000001")


@dataclass(frozen=True, slots=True, kw_only=True)
class Forecast:
    """A budget's outlook at `now`."""

    rate_usd_per_day: Decimal  # the weighted recent daily rate
    rate_low: Decimal  # rate minus one weighted standard deviation (never below zero)
    rate_high: Decimal  # rate plus one
    projected_usd: Decimal | None  # spent by the end of the period at `rate` (None: the period never ends)
    projected_low: Decimal | None
    projected_high: Decimal | None
    run_out: datetime | None  # when spent + held reaches the budget at `rate`, if before the period ends
    run_out_early: datetime | None  # at `rate_high`
    run_out_late: datetime | None  # at `rate_low`


def forecast(
    daily: dict[date, Decimal],
    *,
    spent: Decimal,
    held: Decimal,
    budget: Decimal | None,
    period_start: datetime,
    period_end: datetime | None,
    now: datetime,
) -> Forecast:
    """The outlook of a budget given its spend per UTC day so far in the period (`daily`, days without spend
    omitted), what is spent and held now, and the period's bounds (`period_end` None for a `total` budget)."""
    today = now.date()
    first = max(today - timedelta(days=WINDOW_DAYS - 1), period_start.date())
    values: list[float] = []
    weights: list[float] = []
    day = first
    while day <= today:
        amount = float(daily.get(day, ZERO))
        if day == today:
            # Today so far, scaled to a whole day; no weight until an hour has passed (too little to go on).
            elapsed = (now - datetime.combine(today, datetime.min.time(), tzinfo=now.tzinfo)) / DAY
            if elapsed < 1 / 24:
                break
            amount, weight_scale = amount / elapsed, elapsed
        else:
            weight_scale = 1.0
        age = (today - day).days
        values.append(amount)
        weights.append(weight_scale * 0.5 ** (age / HALF_LIFE_DAYS))
        day += DAY
    total_weight = sum(weights)
    if total_weight == 0:
        mean = deviation = 0.0
    else:
        mean = sum(w * v for w, v in zip(weights, values, strict=True)) / total_weight
        variance = sum(w * (v - mean) ** 2 for w, v in zip(weights, values, strict=True)) / total_weight
        deviation = math.sqrt(variance)
    rate, low, high = _money(mean), _money(max(mean - deviation, 0.0)), _money(mean + deviation)
    left = None if period_end is None else max((period_end - now) / DAY, 0.0)

    def projected(per_day: Decimal) -> Decimal | None:
        return None if left is None else (spent + per_day * Decimal(str(left))).quantize(MICRO_USD)

    def run_out(per_day: Decimal) -> datetime | None:
        if budget is None or per_day <= 0:
            return None
        room = budget - spent - held
        when = now + timedelta(days=max(float(room / per_day), 0.0))
        return when if period_end is None or when < period_end else None

    return Forecast(
        rate_usd_per_day=rate,
        rate_low=low,
        rate_high=high,
        projected_usd=projected(rate),
        projected_low=projected(low),
        projected_high=projected(high),
        run_out=run_out(rate),
        run_out_early=run_out(high),
        run_out_late=run_out(low),
    )


def _money(value: float) -> Decimal:
    return Decimal(str(value)).quantize(MICRO_USD)
