"""Replaying the crash journals of processes that are gone (their lock is free), at start or with
`spendgate journal replay DIR`.

A call whose end line is there gets its record written (if the ledger lacks it); a call that started and never
ended gets an `interrupted` record whose cost is its worst case, flagged `cost_source: estimate`, so every call
the upstream may have billed has a record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete

from proxy.ledger.budgets import end_leases
from proxy.ledger.commit import DEFAULT_SOFT_FRACTION
from proxy.ledger.counters import counters_for
from proxy.ledger.disk import Replayed, replay_records, set_aside
from proxy.ledger.journal import Start, record_from_values, start_from_values
from proxy.ledger.keys import lookup_key_by_id
from proxy.ledger.reprice import correct_estimates
from proxy.ledger.schema import Instance
from proxy.pricing.estimate import estimate_cost
from proxy.pricing.table import PriceTable
from proxy.types import Counter, Hold, Usage, UsageRecord

logger = logging.getLogger("spendgate")
ZERO = Decimal(0)


def replay_gone(
    engine: Engine, directory: Path, prices: PriceTable, *, name: str, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> Replayed:
    """Replay the journals of every process that is gone (its lock is free), then delete them."""
    total = Replayed()
    for lock in sorted(directory.glob("journal-*.lock")) if directory.is_dir() else ():
        instance = lock.name.removeprefix("journal-").removesuffix(".lock")
        fd = os.open(lock, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            total += replay_journal(engine, directory, instance, prices, name=name, soft_fraction=soft_fraction)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return total


def replay_journal(
    engine: Engine,
    directory: Path,
    instance: str,
    prices: PriceTable,
    *,
    name: str,
    soft_fraction: Decimal = DEFAULT_SOFT_FRACTION,
) -> Replayed:
    """Write the records a gone process's journal holds and the `interrupted` records of its unfinished calls."""
    # Replayed here, so no heartbeat reaper need take it for dead (and record its leases) meanwhile.
    with engine.begin() as connection:
        connection.execute(delete(Instance).where(Instance.id == instance))
    segments = sorted(directory.glob(f"journal-{instance}.*.jsonl"), key=lambda p: int(p.name.split(".")[-2]))
    starts: dict[str, Start] = {}
    ended: dict[str, UsageRecord] = {}
    leases: dict[str, UsageRecord] = {}
    bad = 0
    for path in segments:
        for line in path.read_bytes().decode("utf-8", "surrogateescape").splitlines():
            if not line.strip():
                continue
            try:
                kind, *values = json.loads(line)
                if kind == "s":
                    start = start_from_values(values)
                    starts[start.id] = start
                elif kind == "l":
                    void = _lease_void(values, prices)
                    leases[void.id] = void
                else:
                    record = record_from_values(values)
                    ended[record.id] = record
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                # A line cut short by the crash, or damaged: kept with its reason, never a reason not to start.
                set_aside(directory, name, {"line": line[:100_000]}, f"unreadable line in {path.name}: {exc}")
                bad += 1
    records = list(ended.values())
    for call_id, start in starts.items():
        if call_id not in ended:
            records.append(_unfinished(engine, start, prices))
    done = replay_records(engine, records, directory=directory, name=name, soft_fraction=soft_fraction)
    # Every call admitted under its leases has its record now: what the leases still hold is free, and a lease a
    # live replica recorded at its held amount when this process stopped beating was spent by nothing.
    end_leases(engine, instance)
    # Calls a live replica recorded at their held amount when this process stopped beating: now the real cost.
    corrected = correct_estimates(engine, [*ended.values(), *leases.values()], actor=f"journal:{instance}")
    for path in segments:
        path.unlink()
    if records or bad:
        logger.warning(
            "replayed the journal of process %s: %d records written (%d of calls it never finished), %d estimates "
            "corrected, %d set aside",
            instance,
            done.written,
            len(records) - len(ended),
            corrected,
            done.set_aside + bad,
        )
    return Replayed(done.written, done.set_aside + bad, done.crossed)


def _lease_void(values: list[Any], prices: PriceTable) -> UsageRecord:
    """What a lease of a gone process turns out to have cost once every call it covered has its own record:
    nothing (the correction of the estimate the heartbeat reaper wrote for it, if it did)."""
    lease, at, scopes = values
    counters = tuple(
        Counter(scope=scope, label=scope, period="total", period_start=datetime.fromisoformat(start), budget_usd=None)
        for scope, start in scopes
    )
    start = Start(
        id=lease,
        started_at=datetime.fromisoformat(at),
        team=None,
        key_id=None,
        feature=None,
        user=None,
        endpoint="",
        model=None,
        streamed=False,
        max_tokens=None,
        input_bound=0,
        held=None,
        metered=True,
    )
    hold = Hold(call_id=lease, counters=counters, amount=ZERO, held=False)
    return interrupted(start, cost=ZERO, hold=hold, prices=prices)


def interrupted(start: Start, *, cost: Decimal | None, hold: Hold | None, prices: PriceTable) -> UsageRecord:
    """The record of a call that went upstream and never ended: usage unknown, `cost` its worst case, flagged
    `cost_source: estimate`. The one shape for the journal's unfinished calls and the reaper's dead holds."""
    now = datetime.now(UTC)
    return UsageRecord(
        id=start.id,
        started_at=start.started_at,
        finished_at=now,
        team=start.team,
        key_id=start.key_id,
        feature=start.feature,
        user=start.user,
        session=start.session,
        agent=start.agent,
        parent_agent=start.parent_agent,
        endpoint=start.endpoint,
        model=start.model,
        response_model=None,
        upstream_request_id=None,
        status=0,
        outcome="interrupted",
        error_type="process_died",
        streamed=start.streamed,
        usage=Usage(),
        cost_usd=cost if start.metered else None,
        price_version=prices.version_at(start.started_at),
        price_source="table" if start.metered else "unmetered",
        cost_source="estimate",
        max_tokens_requested=start.max_tokens,
        max_tokens_sent=start.max_tokens,
        latency_ms=round((now - start.started_at).total_seconds() * 1000, 3),
        ttfb_ms=None,
        hold=hold,
    )


def _unfinished(engine: Engine, start: Start, prices: PriceTable) -> UsageRecord:
    """A journaled call that never ended, at the hold it took, else an estimate from its model, size and
    `max_tokens`; settled on its key's budgets (blocking)."""
    cost = start.held
    if cost is None and start.metered and start.model:
        cost = estimate_cost(
            {},
            model=start.model,
            input_tokens=start.input_bound,
            max_tokens=start.max_tokens,
            prices=prices,
            at=start.started_at,
        )
    key = lookup_key_by_id(engine, start.key_id) if start.key_id else None
    hold = None
    if key is not None:
        counters = counters_for(key, start.started_at, start.user)
        hold = Hold(call_id=start.id, counters=counters, amount=start.held or Decimal(0), held=True)
    return interrupted(start, cost=cost, hold=hold, prices=prices)
