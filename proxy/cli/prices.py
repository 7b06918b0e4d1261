"""`spendgate prices` and `spendgate prices check`: the price table in force, and models it fails to price."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from proxy.cli.database import open_ledger
from proxy.cli.errors import DRIFT
from proxy.cli.output import print_table
from proxy.cli.values import instant
from proxy.config import Settings


def run_prices(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate prices`: the price table in force now, as text or JSON."""
    from proxy.pricing.table import PriceTable

    table = PriceTable.load(settings.prices_path)
    if args.format == "json":
        print(json.dumps(table.to_json(model=args.model, at=datetime.now(UTC)), indent=2))
        return 0
    print(table.describe(model=args.model, at=datetime.now(UTC)))
    return 0


def run_prices_check(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate prices check`: exit `DRIFT` when the ledger has calls priced by a family fallback or not at all."""
    from proxy.ledger.reports import price_fallbacks

    with open_ledger(settings) as engine:
        found = [f.to_json() for f in price_fallbacks(engine, since=instant(args.since), until=instant(args.until))]
    if args.format == "json":
        print(json.dumps(found, indent=2))
    elif found:
        print_table(("model", "price_source", "calls", "first_seen", "last_seen"), found)
    else:
        print("every call in the period was priced from the table")
    return DRIFT if found else 0
