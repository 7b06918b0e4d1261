#!/usr/bin/env python3
"""Ledger benchmark: fill a database with realistic usage records, then time reports, export and audit verify.

    bench/ledger.py [--db URL] [--records N]

With no --db, a fresh SQLite file in a temporary folder is used; pass a PostgreSQL URL (an empty database) to
measure PostgreSQL. Records go in through the real ledger writer (`insert_records`: hashing, chaining), spread
over 60 days, 20 teams, 200 keys and 8 models. Prints one line per measurement: filling, reports, export, the
dashboard's pages (data and HTML), and audit verify.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.db import make_engine, upgrade
from proxy.ledger.export import iter_usage, write_jsonl
from proxy.ledger.reports import report
from proxy.ledger.teams import TeamSettings, create_team
from proxy.pricing.table import PriceTable
from proxy.surfaces.dashboard.pages import LastVerify, render
from proxy.surfaces.dashboard.views import ledger_page, outlooks, team_page
from proxy.types import Usage, UsageRecord

MODELS = (
    "claude-sonnet-4-6",
    "claude-opus-4-8",
    "claude-haiku-4-5",
    "claude-sonnet-5",
    "claude-opus-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-7",
)
FEATURES = ("search", "chat", "summarise", "agent", None)
END = datetime(2026, 11, 25, tzinfo=UTC)
DAYS = 60
BATCH = 5000


def make_records(first: int, count: int, prices: PriceTable, rng: random.Random) -> list[UsageRecord]:
    records = []
    for n in range(first, first + count):
        started = END - timedelta(seconds=rng.uniform(0, DAYS * 86400))
        model = rng.choice(MODELS)
        usage = Usage(
            input_tokens=rng.randint(50, 20_000),
            output_tokens=rng.randint(1, 4_000),
            cache_read_input_tokens=rng.choice((0, 0, rng.randint(1_000, 100_000))),
            cache_creation_5m_input_tokens=rng.choice((0, 0, 0, rng.randint(1_000, 20_000))),
            service_tier=rng.choice(("standard",) * 9 + ("batch",)),
        )
        cost = prices.price(model=model, usage=usage, at=started)
        team = rng.randrange(20)
        retry = rng.random() < 0.05
        records.append(
            UsageRecord(
                id=f"sgr_{n:012x}",
                started_at=started,
                finished_at=started + timedelta(seconds=rng.uniform(0.2, 30)),
                team=f"team-{team:02}",
                key_id=f"key_{team:02}{rng.randrange(10)}",
                feature=rng.choice(FEATURES),
                user=f"user-{rng.randrange(500)}",
                endpoint="/v1/messages",
                model=model,
                response_model=model,
                upstream_request_id=f"req_{n:012x}",
                status=200,
                outcome="ok",
                error_type=None,
                streamed=rng.random() < 0.6,
                usage=usage,
                cost_usd=cost.cost_usd,
                price_version=cost.price_version,
                price_source=cost.price_source,
                is_retry=retry,
                retry_reason="sdk" if retry else None,
                retry_count=1 if retry else 0,
                max_tokens_requested=4096,
                max_tokens_sent=4096,
                latency_ms=rng.uniform(200, 30_000),
                ttfb_ms=rng.uniform(50, 2_000),
            )
        )
    return records


def _page(template: str, **context: object) -> str:
    return f"{len(render(template, **context)):,} bytes of HTML"


def timed(label: str, work: Callable[[], str]) -> float:
    start = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - start
    print(f"{label:<42} {elapsed:8.2f} s   {result}", flush=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="an empty database URL (default: a temporary SQLite file)")
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spendgate-ledger-bench-") as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'ledger.db'}"
        upgrade(url)
        engine = make_engine(url)
        prices = PriceTable.load()
        rng = random.Random(42)
        print(f"ledger benchmark: {args.records:,} records on {engine.dialect.name}", flush=True)

        def fill() -> str:
            for start in range(0, args.records, BATCH):
                records = make_records(start, min(BATCH, args.records - start), prices, rng)
                # Rows arrive roughly in time order, as they do from a live proxy.
                insert_records(engine, sorted(records, key=lambda r: r.started_at))
            return f"{args.records / max(time.perf_counter() - began, 1e-9):,.0f} records/s"

        began = time.perf_counter()
        timed("fill (ledger writer: hash, chain, insert)", fill)
        since = END - timedelta(days=30)

        def grouped(by: list[str], since: datetime | None) -> str:
            return f"{len(report(engine, prices, by=by, since=since, until=END))} rows"

        timed("report --by team,day (last 30 days)", lambda: grouped(["team", "day"], since))
        timed("report --by model (all 60 days)", lambda: grouped(["model"], None))
        timed("report --by team,feature,user (30 days)", lambda: grouped(["team", "feature", "user"], since))

        def export() -> str:
            count = write_jsonl((record for _, record in iter_usage(engine, since=since)), io.StringIO())
            return f"{count:,} records"

        timed("usage export, jsonl (last 30 days)", export)

        # The dashboard's pages, at a time inside the data: the same queries and templates a browser gets.
        for team in range(20):
            create_team(engine, f"team-{team:02}", TeamSettings(budget_usd=Decimal(50_000)), actor="bench")
        now = END - timedelta(hours=1)
        timed(
            "dashboard overview (20 teams, forecasts)",
            lambda: _page("overview.html", teams=outlooks(engine, prices, now), now=now),
        )

        def team_page_html() -> str:
            page = team_page(engine, prices, "team-07", now)
            return _page("team.html", page=page, outlook=page.outlook, now=now)

        timed("dashboard team page", team_page_html)
        timed(
            "dashboard ledger page",
            lambda: _page("ledger.html", page=ledger_page(engine, Path(folder)), pending=0, last=LastVerify(), now=now),
        )

        def audit() -> str:
            verdict = verify(engine)
            return f"{verdict.entries:,} entries, problem={verdict.problem}"

        seconds = timed("audit verify (whole chain)", audit)
        print(f"{'audit verify rate':<42} {args.records / seconds:,.0f} records/s")
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
