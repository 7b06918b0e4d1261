"""Ledger maintenance: `spendgate db upgrade`, `audit verify` and `audit export`, `reprice`, `journal replay`,
`rollups rebuild` and `prune`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cli.database import actor, check_url, open_ledger
from proxy.cli.errors import UsageError
from proxy.cli.output import progress
from proxy.cli.values import instant
from proxy.config import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from proxy.ledger.disk import Replayed
    from proxy.ledger.retention import Format
    from proxy.pricing.table import PriceTable


def run_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate db upgrade`: the ledger created or migrated to the newest schema."""
    from proxy.ledger.db import upgrade

    url = check_url(settings.db_url)
    upgrade(settings.db_url)
    print(f"database is at the newest migration: {url.render_as_string()}")
    return 0


def run_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate audit verify`: exit 3 where the hash chain breaks or the rollups disagree with the records."""
    from proxy.ledger.audit import verify

    with open_ledger(settings) as engine, progress("verifying the audit chain", "entries") as advance:
        verdict = verify(engine, progress=advance)
    if verdict.problem is not None:
        print(
            f"spendgate: ledger check failed after {verdict.entries} good entries: {verdict.problem}", file=sys.stderr
        )
        return 3
    since = f" from the prune checkpoint at entry {verdict.checkpoint}" if verdict.checkpoint else ""
    print(
        f"audit chain intact: {verdict.entries} entries{since}, head {verdict.head_pos} {verdict.head_hash}; "
        "rollups agree with the records"
    )
    return 0


def run_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate audit export`: admin events as JSON lines, oldest first."""
    from proxy.ledger.audit import iter_events
    from proxy.ledger.export import write_jsonl

    with open_ledger(settings) as engine:
        write_jsonl(iter_events(engine, since=instant(args.since)), sys.stdout)
    return 0


def run_reprice(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate reprice`: stored costs recomputed with the current price table, the originals kept."""
    from proxy.ledger.reprice import recount_current, reprice
    from proxy.pricing.table import PriceTable

    since, until = instant(args.since), instant(args.until)
    if since is None:
        raise UsageError("--since is required")
    prices = PriceTable.load(settings.prices_path)
    with open_ledger(settings) as engine:
        result = reprice(engine, prices, since=since, until=until, actor=actor())
        recount_current(engine, datetime.now(UTC))
    print(
        json.dumps(
            {
                "examined": result.examined,
                "changed": result.changed,
                "cost_before_usd": format(result.total_before, "f"),
                "cost_after_usd": format(result.total_after, "f"),
                "audit_entry": result.event_pos,
            }
        )
    )
    return 0


def run_journal_replay(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate journal replay`: what processes that are gone left on disk, written to the ledger."""
    from proxy.ledger.alerts import notify_now
    from proxy.pricing.table import PriceTable

    with open_ledger(settings) as engine:
        prices = PriceTable.load(settings.prices_path)
        done = _recover(engine, Path(args.directory), prices, settings.soft_limit_fraction)
    notify_now(settings.alert_webhook, done.crossed)
    print(f"replayed {args.directory}: {done.written} records written, {done.set_aside} set aside (refused-*.jsonl)")
    return 0


def _recover(engine: Engine, directory: Path, prices: PriceTable, soft_fraction: Decimal) -> Replayed:
    """Replay journals of gone processes, spill files and records set aside as refused."""
    from proxy.ledger.disk import replay_refused, replay_spilled
    from proxy.ledger.journal_replay import replay_gone

    total = replay_gone(engine, directory, prices, name="replay", soft_fraction=soft_fraction)
    for step in (replay_spilled, replay_refused):
        total += step(engine, directory, name="replay", soft_fraction=soft_fraction)
    return total


def run_rollups_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate rollups rebuild`: every rollup recomputed from the records (pruned days keep their totals)."""
    from proxy.ledger.rollup_checks import rebuild

    with open_ledger(settings) as engine:
        rows = rebuild(engine)
    print(f"rollups rebuilt from the records: {rows} rows")
    return 0


def run_prune(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate prune`: records older than the horizon exported to a file, then deleted (rollups and the audit
    chain's checkpoint stay)."""
    from proxy.ledger.retention import PruneRefused, prune
    from proxy.ledger.windows import calendar_start

    before = instant(args.before)
    if before is None:
        if settings.retention_days is None:
            raise UsageError("give --before DATE, or set SPENDGATE_RETENTION_DAYS")
        before = calendar_start("day", datetime.now(UTC)) - timedelta(days=settings.retention_days)
    fmt: Format = args.format or ("csv" if Path(args.export).name.removesuffix(".gz").endswith(".csv") else "jsonl")
    with open_ledger(settings) as engine, progress("exporting records", "records") as advance:
        try:
            result = prune(engine, before=before, export=Path(args.export), fmt=fmt, actor=actor(), progress=advance)
        except PruneRefused as exc:
            raise UsageError(str(exc)) from None
    print(
        json.dumps(
            {
                "before": before.date().isoformat(),
                "pruned": result.records,
                "export": args.export if result.records else None,
                "export_sha256": result.export_sha256,
                "cut_pos": result.cut_pos,
                "cut_hash": result.cut_hash,
                "audit_entry": result.event_pos,
                "kept_older": result.kept_older,
            }
        )
    )
    return 0
