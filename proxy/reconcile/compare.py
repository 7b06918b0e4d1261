"""The ledger against Anthropic's figures: tokens per hour or day, cost per day, model by model.

A difference is reported with what the ledger knows about that bucket, which usually names its cause:
- Anthropic counts more: calls that did not go through spendgate (the same upstream key used directly, or
  other keys' traffic when the key's id is not configured), or calls recorded as `interrupted` (their process
  died: cost estimated, tokens unknown);
- same tokens, different cost: the price table is wrong for that model (or the call was family-priced or
  unpriced);
- the ledger counts more: Anthropic has not reported the bucket yet (a bucket is taken as final `FINAL_AFTER`
  after it closes; Anthropic says data usually lands within minutes), or a call sits on the other side of a
  bucket boundary (spendgate dates a call when it starts, a batch's results when the batch was created).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, case, func, select

from proxy.ledger import checkpoints
from proxy.ledger.schema import UsageRow, effective_cost
from proxy.pricing.versions import undated
from proxy.reconcile.anthropic import TOKEN_KINDS, WIDTHS, Reported, Width
from proxy.types import TOKEN_KIND_FIELDS

# Buckets younger than this after they close may still grow on Anthropic's side: reported, never failing.
FINAL_AFTER = timedelta(hours=6)
ZERO = Decimal(0)
_COLUMNS = {kind: getattr(UsageRow, TOKEN_KIND_FIELDS.get(kind, kind)) for kind in TOKEN_KINDS}
Key = tuple[datetime, str, str]  # bucket start, model (undated), service tier


@dataclass(slots=True)
class LedgerBucket:
    """What the ledger holds for one bucket, model and service tier."""

    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))
    cost_usd: Decimal = ZERO
    calls: int = 0
    interrupted: int = 0
    fallback_priced: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Difference:
    """One figure on which the ledger and Anthropic disagree."""

    bucket: datetime
    width: Width
    model: str
    service_tier: str
    measure: str  # a token kind, or "cost_usd"
    ledger: Decimal
    anthropic: Decimal
    final: bool
    cause: str

    @property
    def delta(self) -> Decimal:
        """Anthropic minus the ledger."""
        return self.anthropic - self.ledger

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (numbers as exact text)."""
        return {
            "bucket": self.bucket.isoformat(),
            "width": self.width,
            "model": self.model,
            "service_tier": self.service_tier,
            "measure": self.measure,
            "ledger": format(self.ledger, "f"),
            "anthropic": format(self.anthropic, "f"),
            "delta": format(self.delta, "f"),
            "final": self.final,
            "cause": self.cause,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    """The outcome of one comparison."""

    differences: list[Difference]
    buckets_compared: int
    tolerance_usd: Decimal

    @property
    def drifted(self) -> bool:
        """Whether a final bucket differs: any token count, or cost by more than the tolerance."""
        return any(
            d.final and (abs(d.delta) > self.tolerance_usd if d.measure == "cost_usd" else d.delta != 0)
            for d in self.differences
        )


def ledger_buckets(engine: Engine, since: datetime, until: datetime, width: Width) -> dict[Key, LedgerBucket]:
    """The ledger's tokens and cost per bucket, model and service tier (blocking), from the records themselves: a
    range `spendgate prune` cut into is refused, as the records Anthropic counted are no longer all here."""
    with engine.connect() as connection:
        checkpoints.require_records(connection, since, "reconcile from that day on (their export keeps them)")
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        pattern = "%Y-%m-%d %H:00:00" if width == "hour" else "%Y-%m-%d 00:00:00"
        bucket = func.strftime(pattern, UsageRow.started_at)
    else:
        bucket = func.date_trunc(width, UsageRow.started_at)
    model = func.coalesce(UsageRow.response_model, UsageRow.model)
    money = func.decimal_sum if sqlite else func.sum
    query = (
        select(
            bucket,
            model,
            UsageRow.service_tier,
            *[func.sum(column) for column in _COLUMNS.values()],
            money(effective_cost()),
            func.count(),
            func.sum(case((UsageRow.outcome == "interrupted", 1), else_=0)),
            func.sum(case((UsageRow.price_source.in_(("family", "unpriced")), 1), else_=0)),
        )
        .where(UsageRow.started_at >= since, UsageRow.started_at < until)
        .group_by(bucket, model, UsageRow.service_tier)
    )
    found: dict[Key, LedgerBucket] = defaultdict(LedgerBucket)
    with engine.connect() as connection:
        for start, name, tier, *values in connection.execute(query):
            tokens, (cost, calls, interrupted, fallback) = values[: len(_COLUMNS)], values[len(_COLUMNS) :]
            at = datetime.fromisoformat(start) if isinstance(start, str) else start
            held = found[(at.replace(tzinfo=UTC), undated(name or ""), tier or "standard")]
            for kind, count in zip(_COLUMNS, tokens, strict=True):
                held.tokens[kind] += int(count or 0)
            held.cost_usd += Decimal(cost) if cost is not None else ZERO
            held.calls += calls
            held.interrupted += int(interrupted or 0)
            held.fallback_priced += int(fallback or 0)
    return dict(found)


def reconcile(
    *,
    ledger_tokens: dict[Key, LedgerBucket],
    ledger_days: dict[Key, LedgerBucket],
    usage: Iterable[Reported],
    cost: Iterable[Reported],
    width: Width,
    now: datetime,
    tolerance_usd: Decimal,
    key_id_known: bool,
) -> Reconciliation:
    """Compare tokens per `width` bucket and cost per day, model by model."""
    reported_tokens: dict[Key, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TOKEN_KINDS, 0))
    for row in usage:
        counts = reported_tokens[(row.start.astimezone(UTC), undated(row.model), row.service_tier)]
        for kind, count in row.tokens.items():
            counts[kind] += count
    reported_cost: dict[Key, Decimal] = defaultdict(Decimal)
    for row in cost:
        reported_cost[(row.start.astimezone(UTC), undated(row.model), row.service_tier)] += row.cost_usd or ZERO
    span = WIDTHS[width][1]
    differences: list[Difference] = []
    for key in sorted(set(reported_tokens) | set(ledger_tokens)):
        held = ledger_tokens.get(key, LedgerBucket())
        theirs = reported_tokens.get(key, dict.fromkeys(TOKEN_KINDS, 0))
        final = key[0] + span + FINAL_AFTER <= now
        for kind in TOKEN_KINDS:
            if held.tokens[kind] != theirs[kind]:
                differences.append(
                    _difference(
                        key,
                        width,
                        kind,
                        Decimal(held.tokens[kind]),
                        Decimal(theirs[kind]),
                        final,
                        held,
                        key_id_known,
                        tokens_match=False,
                    )
                )
    day = WIDTHS["day"][1]
    for key in sorted(set(reported_cost) | set(ledger_days)):
        held = ledger_days.get(key, LedgerBucket())
        theirs_cost = reported_cost.get(key, ZERO)
        if held.cost_usd != theirs_cost:
            day_tokens = _day_tokens(reported_tokens, key, width)
            tokens_match = day_tokens is not None and day_tokens == held.tokens
            final = key[0] + day + FINAL_AFTER <= now
            differences.append(
                _difference(
                    key,
                    "day",
                    "cost_usd",
                    held.cost_usd,
                    theirs_cost,
                    final,
                    held,
                    key_id_known,
                    tokens_match=tokens_match,
                )
            )
    return Reconciliation(
        differences=differences,
        buckets_compared=len(set(reported_tokens) | set(ledger_tokens)),
        tolerance_usd=tolerance_usd,
    )


def _day_tokens(reported: dict[Key, dict[str, int]], key: Key, width: Width) -> dict[str, int] | None:
    """Anthropic's tokens for the day of `key` (summed from hourly buckets if need be)."""
    day, model, tier = key
    total = dict.fromkeys(TOKEN_KINDS, 0)
    seen = False
    for (start, other_model, other_tier), counts in reported.items():
        if other_model == model and other_tier == tier and day <= start < day + timedelta(days=1):
            seen = True
            for kind, count in counts.items():
                total[kind] += count
    return total if seen or width == "day" else None


def _difference(
    key: Key,
    width: Width,
    measure: str,
    ledger: Decimal,
    anthropic: Decimal,
    final: bool,
    held: LedgerBucket,
    key_id_known: bool,
    *,
    tokens_match: bool,
) -> Difference:
    bucket, model, tier = key
    return Difference(
        bucket=bucket,
        width=width,
        model=model or "(no model)",
        service_tier=tier,
        measure=measure,
        ledger=ledger,
        anthropic=anthropic,
        final=final,
        cause=_cause(ledger, anthropic, final, held, key_id_known, tokens_match=tokens_match, no_model=not model),
    )


def _cause(
    ledger: Decimal,
    anthropic: Decimal,
    final: bool,
    held: LedgerBucket,
    key_id_known: bool,
    *,
    tokens_match: bool,
    no_model: bool,
) -> str:
    causes = []
    if no_model:
        causes.append("a cost Anthropic ties to no model (web search in the legacy cost report): compare day totals")
    if held.interrupted:
        causes.append(
            f"{held.interrupted} calls recorded as interrupted (their process died: cost estimated, tokens unknown)"
        )
    if held.fallback_priced:
        causes.append(f"{held.fallback_priced} calls priced by family fallback or unpriced (spendgate prices check)")
    if tokens_match and ledger != anthropic:
        causes.append("same tokens, different cost: the price table is wrong for this model (check prices.toml)")
    elif anthropic > ledger and not held.interrupted:
        causes.append(
            "calls that did not go through spendgate (the upstream key used directly)"
            + ("" if key_id_known else ", or other keys of the organisation: set SPENDGATE_ANTHROPIC_API_KEY_ID")
        )
    elif ledger > anthropic:
        causes.append(
            "not final yet: Anthropic is still reporting this bucket"
            if not final
            else "calls on the other side of a bucket boundary, or batch results (dated at the batch's creation)"
        )
    return "; ".join(causes)
