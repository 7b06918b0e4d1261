"""Charts drawn on the server as inline SVG: no script, nothing fetched, readable at any width.

A chart library would mean shipping and auditing a few hundred kilobytes of JavaScript for two chart types;
SVG written here is a few dozen lines, scales with the page (viewBox), and prints.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 76, 12, 12, 28
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
# Colour-blind-safe (Okabe-Ito), then grey for the rest.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
OTHER_COLOUR = "#999999"


def money(amount: Decimal | None) -> str:
    """Dollars for people: cents from a dollar up, more digits below it (LLM calls cost fractions of a cent)."""
    if amount is None:
        return "—"
    if amount == 0 or abs(amount) >= 1:
        return f"${amount:,.2f}"
    if abs(amount) >= Decimal("0.01"):
        return f"${amount:.4f}"
    return f"${amount:.6f}"


def colour(index: int) -> str:
    """The series colour at `index` in legend order."""
    return PALETTE[index] if index < len(PALETTE) else OTHER_COLOUR


def stacked_days(days: list[date], series: dict[str, list[Decimal]], *, title: str) -> Markup:
    """Daily bars, one segment per series (e.g. per model), stacked; each segment says its value on hover."""
    totals = [sum((values[i] for values in series.values()), Decimal(0)) for i in range(len(days))]
    top = _nice(max(totals, default=Decimal(0)))
    slot = _slot(days)
    parts = []
    for i, day in enumerate(days):
        y = float(TOP + PLOT_H)
        for index, (name, values) in enumerate(series.items()):
            value = values[i]
            if value <= 0:
                continue
            height = float(value / top) * PLOT_H if top else 0.0
            y -= height
            parts.append(
                f'<rect x="{LEFT + i * slot + slot * 0.15:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
                f'height="{height:.1f}" fill="{colour(index)}"><title>{escape(name)} {day}: '
                f"{money(value)}</title></rect>"
            )
    return _chart(title, top, days, parts)


def to_date(
    days: list[date],
    cumulative: list[Decimal],
    *,
    budget: Decimal | None,
    forecast: tuple[Decimal, Decimal, Decimal] | None,
    title: str,
) -> Markup:
    """Spend to date against the budget; `forecast` is the projected total at the period's end (low, mid, high),
    drawn from the last day to the end of the chart as a dashed line in a band."""
    highest = max([*cumulative, budget or Decimal(0), *(forecast or ())], default=Decimal(0))
    top = _nice(highest)
    slot = _slot(days)

    def y(value: Decimal) -> float:
        return TOP + PLOT_H - (float(value / top) * PLOT_H if top else 0.0)

    parts = []
    known = [(LEFT + (i + 0.5) * slot, y(value)) for i, value in enumerate(cumulative)]
    if known:
        points = " ".join(f"{x:.1f},{yy:.1f}" for x, yy in known)
        parts.append(f'<polyline points="{points}" fill="none" stroke="#0072B2" stroke-width="2.5"/>')
    if forecast is not None and known:
        low, mid, high = forecast
        x0, y0 = known[-1]
        x1 = LEFT + PLOT_W
        parts.append(
            f'<polygon points="{x0:.1f},{y0:.1f} {x1:.1f},{y(high):.1f} {x1:.1f},{y(low):.1f}" fill="#0072B2" '
            'fill-opacity="0.12"><title>forecast range</title></polygon>'
        )
        parts.append(
            f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y(mid):.1f}" stroke="#0072B2" stroke-width="2" '
            f'stroke-dasharray="6 4"><title>forecast: {money(mid)} at the end of the period</title></line>'
        )
    if budget is not None:
        parts.append(
            f'<line x1="{LEFT}" y1="{y(budget):.1f}" x2="{LEFT + PLOT_W}" y2="{y(budget):.1f}" stroke="#D55E00" '
            f'stroke-width="2"><title>budget {money(budget)}</title></line>'
            f'<text x="{LEFT + PLOT_W - 4}" y="{y(budget) - 4:.1f}" text-anchor="end" fill="#D55E00">budget</text>'
        )
    return _chart(title, top, days, parts)


def _slot(days: list[date]) -> float:
    """The width each day takes."""
    return PLOT_W / max(len(days), 1)


def _chart(title: str, top: Decimal, days: list[date], body: list[str]) -> Markup:
    """A whole chart: frame, value axis up to `top`, the drawing, day labels."""
    parts = [_frame(title), *_y_axis(top), *body, *_x_labels(days, _slot(days)), "</svg>"]
    return Markup("".join(parts))  # noqa: S704 (every text in it went through `escape`)


def _frame(title: str) -> str:
    return (
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg" font-size="12" font-family="system-ui, sans-serif">'
        f"<title>{escape(title)}</title>"
    )


def _y_axis(top: Decimal) -> list[str]:
    parts = []
    for step in range(5):
        value = top * step / 4
        y = TOP + PLOT_H - PLOT_H * step / 4
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{money(value)}</text>'
        )
    return parts


def _x_labels(days: list[date], slot: float) -> list[str]:
    if not days:
        return []
    every = max(1, len(days) // 8)
    return [
        f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{HEIGHT - 8}" text-anchor="middle" fill="#555">'
        f"{day.strftime('%b %d')}</text>"
        for i, day in enumerate(days)
        if i % every == 0
    ]


def _nice(value: Decimal) -> Decimal:
    """A round axis maximum at or above `value` (1, 2 or 5 times a power of ten)."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for step in (1, 2, 5, 10):
        candidate = Decimal(step).scaleb(exponent)
        if candidate >= value:
            return candidate
    return Decimal(10).scaleb(exponent)
