"""`spendgate usage` and `spendgate report`: usage records as they are, and their totals grouped."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from proxy.cli.database import open_ledger
from proxy.cli.errors import UsageError
from proxy.cli.output import money_shown, print_csv, print_table, progress
from proxy.cli.values import instant, positive_int
from proxy.config import Settings


def run_usage(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate usage`: usage records, oldest first, streamed as JSON lines or CSV."""
    from proxy.ledger.export import iter_usage, write_csv, write_jsonl
    from proxy.ledger.teams import get_team

    since, until = instant(args.since), instant(args.until)
    writer = write_csv if args.format == "csv" else write_jsonl
    with open_ledger(settings) as engine, progress("exporting usage records", "records") as advance:
        if args.team is not None:
            # A filter naming no team would print nothing and succeed: a typo would pass for a team without calls.
            get_team(engine, args.team)
        records = iter_usage(engine, team=args.team, session=args.session, since=since, until=until)
        writer((_counted(record, n, advance) for n, (_, record) in enumerate(records, 1)), sys.stdout)
    return 0


def _counted(record: dict[str, Any], n: int, advance: Callable[[int, int | None], None]) -> dict[str, Any]:
    if n % 1000 == 0:
        advance(n, None)
    return record


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate report`: totals of calls, tokens, cost and retry cost, grouped `--by` the fields given."""
    from proxy.ledger.reports import REPORT_PAGE, report, report_page
    from proxy.pricing.table import PriceTable

    by = [name.strip() for name in args.by.split(",") if name.strip()] if args.by else []
    since, until = instant(args.since), instant(args.until)
    prices = PriceTable.load(settings.prices_path)
    with open_ledger(settings) as engine:
        if args.limit is None and args.cursor is None:
            found, next_cursor = report(engine, prices, by=by, since=since, until=until), None
        else:
            limit = REPORT_PAGE if args.limit is None else positive_int(args.limit)
            try:
                page = report_page(engine, prices, by=by, limit=limit, cursor=args.cursor, since=since, until=until)
            except ValueError as error:
                raise UsageError(str(error)) from None
            found, next_cursor = page.rows, page.next_cursor
    rows = [row.to_json() for row in found]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print_csv(list(rows[0]) if rows else by, rows)
    else:
        columns = [
            *by,
            "calls",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "retries",
            "retry_cost_usd",
            "cache_savings_usd",
            "batch_savings_usd",
            "unpriced_calls",
        ]
        print_table(columns, money_shown(rows))
    if next_cursor is not None:
        print(f"more groups follow: --cursor {next_cursor}", file=sys.stderr)
    return 0
