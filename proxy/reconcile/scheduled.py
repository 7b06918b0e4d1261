"""Scheduled reconciliation: each closed, final UTC day of the last week, once, by one replica at a time.

Days are rows of `reconciled_days`; a replica claims a day with a lease (an update that only succeeds while
no other replica holds it), checks it against the Admin API, and stores the outcome. A replica that dies
mid-check leaves a lease that lapses. Drift is logged, sent to the alert webhook, shown on the dashboard's
ledger page and exposed as metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from proxy.ledger import checkpoints
from proxy.ledger.db import write_transaction
from proxy.ledger.schema import ReconciledDay
from proxy.reconcile.anthropic import AdminClient
from proxy.reconcile.compare import FINAL_AFTER, ledger_buckets, reconcile

DAYS_BACK = 7
LEASE = timedelta(minutes=10)
DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class DayResult:
    """A day's outcome, as stored."""

    day: datetime
    checked_at: datetime
    drifted: bool
    ledger_cost_usd: Decimal
    anthropic_cost_usd: Decimal
    differences: int

    def alert(self) -> dict[str, Any]:
        """The webhook's JSON body for a drifted day."""
        return {
            "event": "reconcile_drift",
            "day": self.day.date().isoformat(),
            "ledger_cost_usd": format(self.ledger_cost_usd, "f"),
            "anthropic_cost_usd": format(self.anthropic_cost_usd, "f"),
            "differences": self.differences,
        }


def claim_day(engine: Engine, now: datetime, *, skip: Collection[datetime] = ()) -> datetime | None:
    """A final day of the last week nobody has checked or is checking (and not in `skip`), leased to the caller
    (blocking)."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with engine.connect() as connection:
        cut = checkpoints.latest(connection)
    # A pruned day's records are gone: there is nothing left to hold against Anthropic's figures.
    first = today - DAYS_BACK * DAY if cut is None else max(today - DAYS_BACK * DAY, cut.before)
    days = [
        day
        for n in range(DAYS_BACK, 0, -1)
        if (day := today - n * DAY) + DAY + FINAL_AFTER <= now and day not in skip and day >= first
    ]
    for day in days:
        with write_transaction(engine) as connection:
            if connection.execute(select(ReconciledDay.day).where(ReconciledDay.day == day)).first() is None:
                try:
                    with connection.begin_nested():
                        connection.execute(insert(ReconciledDay).values(day=day))
                except IntegrityError:
                    pass  # another replica made the row first; the claim below decides
            claimed = connection.execute(
                update(ReconciledDay)
                .where(
                    ReconciledDay.day == day,
                    ReconciledDay.checked_at.is_(None),
                    or_(ReconciledDay.lease_until.is_(None), ReconciledDay.lease_until < now),
                )
                .values(lease_until=now + LEASE)
            ).rowcount
        if claimed:
            return day
    return None


def check_day(
    engine: Engine, client: AdminClient, day: datetime, *, tolerance_usd: Decimal, now: datetime
) -> DayResult:
    """Compare one day (tokens and cost) and store the outcome (blocking)."""
    ledger = ledger_buckets(engine, day, day + DAY, "day")
    result = reconcile(
        ledger_tokens=ledger,
        ledger_days=ledger,
        usage=client.usage(day, day + DAY, "day"),
        cost=client.cost(day, day + DAY),
        width="day",
        now=now,
        tolerance_usd=tolerance_usd,
        key_id_known=client.api_key_id is not None,
    )
    ledger_cost = sum((bucket.cost_usd for bucket in ledger.values()), Decimal(0))
    cost_drift = sum((d.delta for d in result.differences if d.measure == "cost_usd"), Decimal(0))
    outcome = DayResult(
        day=day,
        checked_at=now,
        drifted=result.drifted,
        ledger_cost_usd=ledger_cost,
        anthropic_cost_usd=ledger_cost + cost_drift,
        differences=len(result.differences),
    )
    with write_transaction(engine) as connection:
        connection.execute(
            update(ReconciledDay)
            .where(ReconciledDay.day == day)
            .values(
                checked_at=now,
                lease_until=None,
                drifted=outcome.drifted,
                ledger_cost_usd=outcome.ledger_cost_usd,
                anthropic_cost_usd=outcome.anthropic_cost_usd,
                differences=outcome.differences,
                details=json.dumps([d.to_json() for d in result.differences]),
            )
        )
    return outcome


def release_day(engine: Engine, day: datetime) -> None:
    """Give a claimed day back unchecked (the Admin API failed): the next run, here or elsewhere, tries again."""
    with write_transaction(engine) as connection:
        connection.execute(update(ReconciledDay).where(ReconciledDay.day == day).values(lease_until=None))


def recent(engine: Engine, limit: int = DAYS_BACK) -> list[DayResult]:
    """The latest checked days, newest first."""
    query = (
        select(ReconciledDay)
        .where(ReconciledDay.checked_at.is_not(None))
        .order_by(ReconciledDay.day.desc())
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        DayResult(
            day=row.day,
            checked_at=row.checked_at,
            drifted=bool(row.drifted),
            ledger_cost_usd=row.ledger_cost_usd or Decimal(0),
            anthropic_cost_usd=row.anthropic_cost_usd or Decimal(0),
            differences=row.differences or 0,
        )
        for row in rows
    ]


def run_once(
    engine: Engine, client: AdminClient, *, tolerance_usd: Decimal, now: Callable[[], datetime]
) -> list[DayResult]:
    """Check every day this replica can claim now; returns their outcomes (blocking, for a worker thread). A day
    that fails is given back and the others still checked; the first failure is raised at the end."""
    checked: list[DayResult] = []
    failed: list[datetime] = []
    first_error: Exception | None = None
    while (day := claim_day(engine, now(), skip=failed)) is not None:
        try:
            checked.append(check_day(engine, client, day, tolerance_usd=tolerance_usd, now=now()))
        except Exception as exc:
            release_day(engine, day)
            failed.append(day)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return checked
