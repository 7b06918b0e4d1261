"""Repricing: recompute stored costs after a price correction, keeping what was first recorded.

A record's content hash covers the cost it was written with, so a correction never edits that cost: it sits
beside it (`repriced_cost_usd`, `repriced_price_version`, `repriced_by`). Each correction is also kept in the
append-only `reprice_entries`, and one audit event vouches for all of a run's entries with their digest;
`spendgate audit verify` checks both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from proxy.ledger import rollups
from proxy.ledger.audit import REPRICE_ACTION, Change, record_event, reprice_digest
from proxy.ledger.budgets import recount, recount_users, settle
from proxy.ledger.checkpoints import lock_head
from proxy.ledger.counters import key_counters, team_counters
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import budget_columns
from proxy.ledger.schema import APIKey, RepriceEntry, Team, UsageRow
from proxy.ledger.teams import team_windows, user_windows
from proxy.ledger.windows import counted, windows_of
from proxy.pricing.table import PriceTable
from proxy.types import USAGE_COLUMNS, Usage, UsageRecord

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Repricing:
    """What a reprice run changed."""

    examined: int
    changed: int
    total_before: Decimal
    total_after: Decimal
    event_pos: int | None


def reprice(engine: Engine, prices: PriceTable, *, since: datetime, until: datetime | None, actor: str) -> Repricing:
    """Recompute the cost of every record started in [since, until) with `prices`, and write an audit event."""
    columns = [UsageRow.id, UsageRow.model, UsageRow.response_model, UsageRow.started_at, UsageRow.cost_usd]
    columns += [UsageRow.repriced_cost_usd, *[getattr(UsageRow, name) for name in USAGE_COLUMNS]]
    query = select(*columns).where(UsageRow.started_at >= since).order_by(UsageRow.id)
    if until is not None:
        query = query.where(UsageRow.started_at < until)
    with write_transaction(engine) as connection:
        # The chain's lock first: no record joins the range or the chain while we work on it.
        lock_head(connection)
        examined, before, after = 0, ZERO, ZERO
        changes: list[Change] = []
        for row in connection.execute(query):
            examined += 1
            current = row.repriced_cost_usd if row.repriced_cost_usd is not None else row.cost_usd
            usage = Usage(**{name: getattr(row, name) for name in USAGE_COLUMNS})
            cost = prices.price(model=row.response_model or row.model or "", usage=usage, at=row.started_at)
            # A model the corrected table does not price keeps what it had; so does a cost that did not change.
            if cost.cost_usd is None or cost.cost_usd == current:
                continue
            changes.append((row.id, cost.cost_usd, cost.price_version))
            before += current or ZERO
            after += cost.cost_usd
        if not changes:
            return Repricing(examined=examined, changed=0, total_before=ZERO, total_after=ZERO, event_pos=None)
        pos = record_event(
            connection,
            actor=actor,
            action=REPRICE_ACTION,
            target="usage_records",
            before={"cost_usd": format(before, "f")},
            after={
                "since": since.isoformat(),
                "until": until.isoformat() if until else None,
                "changed": len(changes),
                "cost_usd": format(after, "f"),
                "digest": reprice_digest(changes),
            },
        )
        _write(connection, changes, pos)
    return Repricing(examined=examined, changed=len(changes), total_before=before, total_after=after, event_pos=pos)


def correct_estimates(engine: Engine, actual: Sequence[UsageRecord], *, actor: str) -> int:
    """Correct records first written at an estimate (`cost_source: estimate`, a call whose process died) with the
    actual records a journal replay found: the cost beside the estimate, vouched for by one audit event like a
    reprice, and the difference settled on the calls' budgets. Returns how many were corrected (blocking)."""
    by_id = {record.id: record for record in actual}
    costs = {record.id: record.cost_usd for record in actual if record.cost_usd is not None}
    if not costs:
        return 0
    query = select(UsageRow.id, UsageRow.cost_usd).where(
        UsageRow.id.in_(list(costs)), UsageRow.cost_source == "estimate", UsageRow.repriced_cost_usd.is_(None)
    )
    with write_transaction(engine) as connection:
        lock_head(connection)
        estimates = {row.id: row.cost_usd or ZERO for row in connection.execute(query)}
        changes: list[Change] = [(i, costs[i], by_id[i].price_version) for i in sorted(estimates)]
        if not changes:
            return 0
        pos = record_event(
            connection,
            actor=actor,
            action=REPRICE_ACTION,
            target="usage_records",
            before={"cost_usd": format(sum(estimates.values(), ZERO), "f")},
            after={
                "reason": "a journal replay found the actual usage of calls recorded at their worst case",
                "changed": len(changes),
                "cost_usd": format(sum((cost for _, cost, _ in changes), ZERO), "f"),
                "digest": reprice_digest(changes),
            },
        )
        _write(connection, changes, pos)
        # The estimate was spent on the calls' budgets when it was recorded; now the difference is.
        differences = [
            replace(by_id[record_id], cost_usd=cost - estimates[record_id]) for record_id, cost, _ in changes
        ]
        settle(connection, differences, soft_fraction=Decimal(1))
    return len(changes)


def _write(connection: Connection, changes: list[Change], pos: int) -> None:
    rollups.correct(connection, {record_id: cost for record_id, cost, _ in changes})
    connection.execute(
        insert(RepriceEntry),
        [{"event_pos": pos, "record_id": r, "cost_usd": c, "price_version": v} for r, c, v in changes],
    )
    connection.execute(
        update(UsageRow)
        .where(UsageRow.id == bindparam("record_id"))
        .values(repriced_cost_usd=bindparam("cost"), repriced_price_version=bindparam("version"), repriced_by=pos),
        [{"record_id": r, "cost": c, "version": v} for r, c, v in changes],
    )


def recount_current(engine: Engine, now: datetime) -> None:
    """Bring every team's, key's and end user's spend in its current windows in line with corrected costs."""
    with engine.connect() as connection:
        teams = connection.execute(select(Team)).all()
        keys = connection.execute(select(APIKey.id, APIKey.period, *budget_columns(APIKey))).all()
    for team in teams:
        for counter in team_counters(team.id, team.name, team.period, team_windows(team), now):
            recount(engine, counter, {"team": team.name})
        for period in counted(user_windows(team), team.period):
            recount_users(engine, team.id, team.name, period, now)
    for key_id, period, *amounts in keys:
        for counter in key_counters(key_id, period, windows_of(period, *amounts), now):
            recount(engine, counter, {"key": key_id})
