"""`spendgate reconcile`: the ledger against Anthropic's own usage and cost reports."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta

from proxy.cli.database import open_ledger
from proxy.cli.errors import DRIFT, UsageError
from proxy.cli.output import print_csv, print_table
from proxy.cli.values import money
from proxy.config import Settings
from proxy.types import parse_instant


def run_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate reconcile`: where the ledger and Anthropic's reports differ; exit `DRIFT` on drift."""
    from proxy.reconcile.anthropic import AdminClient
    from proxy.reconcile.compare import ledger_buckets, reconcile

    if settings.anthropic_admin_key is None:
        raise UsageError(
            "SPENDGATE_ANTHROPIC_ADMIN_KEY is not set: reconcile reads Anthropic's usage and cost reports with an "
            "Admin API key (Console > Settings > Admin keys, sk-ant-admin...)."
        )
    since, until = parse_instant(args.since).astimezone(UTC), parse_instant(args.until).astimezone(UTC)
    if until <= since:
        raise UsageError(f"--until {args.until} is not after --since {args.since}")
    tolerance = money(args.tolerance) if args.tolerance is not None else settings.reconcile_tolerance
    client = AdminClient(
        settings.anthropic_admin_key, base_url=settings.admin_api_url, api_key_id=settings.anthropic_api_key_id
    )
    # Cost is compared per UTC day: whole days around the period, on both sides.
    first_day = since.replace(hour=0, minute=0, second=0, microsecond=0)
    last_day = until.replace(hour=0, minute=0, second=0, microsecond=0)
    days = (first_day, last_day if last_day == until else last_day + timedelta(days=1))
    with open_ledger(settings) as engine:
        result = reconcile(
            ledger_tokens=ledger_buckets(engine, since, until, args.by),
            ledger_days=ledger_buckets(engine, *days, "day"),
            usage=client.usage(since, until, args.by),
            cost=client.cost(*days),
            width=args.by,
            now=datetime.now(UTC),
            tolerance_usd=tolerance,
            key_id_known=settings.anthropic_api_key_id is not None,
        )
    rows = [difference.to_json() for difference in result.differences]
    if args.format == "json":
        print(json.dumps({"drift": result.drifted, "buckets": result.buckets_compared, "differences": rows}, indent=2))
    elif args.format == "csv":
        print_csv(list(rows[0]) if rows else ["bucket"], rows)
    elif rows:
        print_table(
            ("bucket", "model", "service_tier", "measure", "ledger", "anthropic", "delta", "final", "cause"), rows
        )
    else:
        print(f"no differences: {result.buckets_compared} buckets agree with Anthropic's reports")
    return DRIFT if result.drifted else 0
