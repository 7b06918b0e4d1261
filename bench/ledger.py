#!/usr/bin/env python3
"""Ledger benchmark: fill a database with usage records through the real writer, then time every report, the
dashboard's pages, export, rollups rebuild, audit verify and prune.

    bench/ledger.py [--db URL] [--records N] [--filled] [--reports-only]

With no --db, a fresh SQLite file in a temporary folder is used; pass a PostgreSQL URL (an empty database) to
measure PostgreSQL. `--filled`: the database is one this bench filled before (with the same --records) and did
not prune yet, so the fill (an hour at 10 million records) is skipped and everything after it measured again.
`--reports-only`: stop after the reports, their pages and the dashboard (no rebuild, verify or prune).

Records go in through `insert_records` (hashing, chaining, rollups), in time order over 60 days: a fleet of
1,000 developers on Claude Code in 20 teams (personal keys, 5 sessions a day, subagents), who also use their
team's internal application (its key, features). Prints one line per measurement. Exit 3 when a
report changed across the prune.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine, func, select

from proxy.identity.roles import Principal
from proxy.ledger.audit import verify
from proxy.ledger.commit import insert_records
from proxy.ledger.db import make_engine, upgrade
from proxy.ledger.end_users import list_users
from proxy.ledger.export import iter_usage, write_jsonl
from proxy.ledger.reports import report, report_page
from proxy.ledger.retention import prune
from proxy.ledger.rollup_checks import rebuild
from proxy.ledger.rollups import ROLLUPS
from proxy.ledger.teams import TeamSettings, create_team, list_teams
from proxy.pricing.table import PriceTable
from proxy.surfaces.dashboard.pages import LastVerify, render
from proxy.surfaces.dashboard.views import ledger_page, my_spend, outlooks, team_page
from proxy.types import GROUPS, Usage, UsageRecord

# A Claude Code fleet: each developer's main model, and the small model of its background calls.
MAIN_MODELS = ("claude-sonnet-4-5-20250929",) * 6 + ("claude-opus-4-7", "claude-opus-4-7", "claude-sonnet-4-6")
SMALL_MODEL = "claude-haiku-4-5-20251001"
# An application per team: each feature on its model.
FEATURES = {
    "search": "claude-haiku-4-5",
    "chat": "claude-sonnet-4-6",
    "summarise": "claude-sonnet-5",
    "agent": "claude-opus-4-8",
    None: "claude-opus-5",
}
TEAMS = 20
DEVELOPERS = 1000
SESSIONS_A_DAY = 5
END = datetime(2026, 11, 25, tzinfo=UTC)
DAYS = 60
START = END - timedelta(days=DAYS)
# Records per writer transaction (the proxy's writer takes what is waiting, up to its own batch size).
BATCH = 20_000
ADMIN = Principal(actor="admin-token", csrf="bench", is_admin=True)


def make_records(first: int, count: int, total: int, prices: PriceTable, rng: random.Random) -> list[UsageRecord]:
    """Records `first` to `first + count` of `total` spread evenly over the `DAYS`, in time order as a live proxy
    writes them: 70% a developer's Claude Code call (personal key, its main model or a small one, sessions,
    subagents), 30% a call of their team's internal application on their behalf (its key, a feature and its
    model)."""
    records = []
    for n in range(first, first + count):
        started = START + timedelta(seconds=(n + rng.random()) * DAYS * 86400 / total)
        if rng.random() < 0.7:
            developer = rng.randrange(DEVELOPERS)
            team, key, user, feature = developer % TEAMS, f"key_dev{developer:04}", f"oidc:dev-{developer:04}", None
            session = f"{developer:04}-{started.date().isoformat()}-{rng.randrange(SESSIONS_A_DAY)}"
            agent = None if rng.random() < 0.7 else f"{session}-sub{rng.randrange(3)}"
            model = SMALL_MODEL if rng.random() < 0.2 else MAIN_MODELS[developer % len(MAIN_MODELS)]
        else:
            developer = rng.randrange(DEVELOPERS)
            team, user, feature = developer % TEAMS, f"oidc:dev-{developer:04}", rng.choice(list(FEATURES))
            key, session, agent, model = f"key_app{team:02}", None, None, FEATURES[feature]
        usage = Usage(
            input_tokens=rng.randint(50, 20_000),
            output_tokens=rng.randint(1, 4_000),
            cache_read_input_tokens=rng.choice((0, 0, rng.randint(1_000, 100_000))),
            cache_creation_5m_input_tokens=rng.choice((0, 0, 0, rng.randint(1_000, 20_000))),
            service_tier=rng.choice(("standard",) * 9 + ("batch",)),
        )
        cost = prices.price(model=model, usage=usage, at=started)
        retry = rng.random() < 0.05
        records.append(
            UsageRecord(
                id=f"sgr_{n:012x}",
                started_at=started,
                finished_at=started + timedelta(seconds=rng.uniform(0.2, 30)),
                team=f"team-{team:02}",
                key_id=key,
                feature=feature,
                user=user,
                session=session,
                agent=agent,
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
    return f"{len(render(template, me=ADMIN, **context)):,} bytes of HTML"


def timed(label: str, work: Callable[[], str]) -> float:
    start = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - start
    print(f"{label:<42} {elapsed:8.2f} s   {result}", flush=True)
    return elapsed


def paged(engine: Engine, prices: PriceTable, by: list[str], since: datetime, until: datetime) -> None:
    """Every page of 1,000 groups of a report, in turn: the first page's time, and the median and slowest."""
    times, rows, cursor = [], 0, None
    while True:
        start = time.perf_counter()
        page = report_page(engine, prices, by=by, limit=1000, cursor=cursor, since=since, until=until)
        times.append(time.perf_counter() - start)
        rows += len(page.rows)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    label = f"report --by {','.join(by)} (30 days), pages of 1,000"
    summary = f"first {times[0]:.2f} s, median {statistics.median(times):.2f} s, slowest {max(times):.2f} s"
    print(f"{label:<42} {sum(times):8.2f} s   {len(times)} pages, {rows:,} rows; {summary}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="an empty database URL (default: a temporary SQLite file)")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--filled", action="store_true", help="skip the fill: --db was filled by this bench before")
    parser.add_argument("--reports-only", action="store_true", help="no rebuild, verify or prune")
    args = parser.parse_args()
    if args.filled and not args.db:
        parser.error("--filled needs the --db this bench filled")
    with tempfile.TemporaryDirectory(prefix="spendgate-ledger-bench-") as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'ledger.db'}"
        upgrade(url)
        engine = make_engine(url)
        prices = PriceTable.load()
        rng = random.Random(42)
        print(f"ledger benchmark: {args.records:,} records on {engine.dialect.name}", flush=True)

        def fill() -> str:
            for start in range(0, args.records, BATCH):
                insert_records(engine, make_records(start, min(BATCH, args.records - start), args.records, prices, rng))
            return f"{args.records / max(time.perf_counter() - began, 1e-9):,.0f} records/s"

        began = time.perf_counter()
        if not args.filled:
            timed("fill (ledger writer: hash, chain, roll up)", fill)
        with engine.connect() as connection:
            for table in ROLLUPS:
                rows = connection.execute(select(func.count()).select_from(table)).scalar_one()
                print(f"{'  rows in ' + table.name:<42} {rows:>11,}")
        month = END - timedelta(days=30)

        def grouped(by: list[str], since: datetime | None, until: datetime = END) -> Callable[[], str]:
            return lambda: f"{len(report(engine, prices, by=by, since=since, until=until)):,} rows"

        before_prune = report(engine, prices, by=["team", "day"], since=None, until=END)
        for group in GROUPS:
            timed(f"report --by {group} (30 days)", grouped([group], month))
        timed("report --by team,day (30 days)", grouped(["team", "day"], month))
        timed("report --by team,feature,user (30 days)", grouped(["team", "feature", "user"], month))
        timed("report --by model (all 60 days)", grouped(["model"], None))
        timed("report --by team (30 days from 13:00)", grouped(["team"], month + timedelta(hours=13)))
        for by in (["session"], ["agent"], ["user"]):
            paged(engine, prices, by, month, END)

        def export() -> str:
            day = END - timedelta(days=1)
            count = write_jsonl((record for _, record in iter_usage(engine, since=day, until=END)), io.StringIO())
            return f"{count:,} records"

        timed("usage export, jsonl (the last day)", export)

        # The dashboard's pages, at a time inside the data: the same queries and templates a browser gets.
        known = {team.name for team in list_teams(engine)}
        for team in range(TEAMS):
            if f"team-{team:02}" not in known:
                create_team(engine, f"team-{team:02}", TeamSettings(budget_usd=Decimal(500_000)), actor="bench")
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
        timed(
            "dashboard my spend (one developer)",
            lambda: f"{len(my_spend(engine, 'oidc:dev-0007', ('team-07',), now))} teams",
        )
        timed("teams users (one team, this month)", lambda: f"{len(list_users(engine, 'team-07', now=now))} users")
        if args.reports_only:
            engine.dispose()
            return 0
        timed("rollups rebuild", lambda: f"{rebuild(engine):,} rows")

        def audit() -> str:
            verdict = verify(engine)
            return f"{verdict.entries:,} entries, problem={verdict.problem}"

        seconds = timed("audit verify (chain and rollups)", audit)
        print(f"{'audit verify rate':<42} {args.records / seconds:,.0f} records/s")

        def prune_month() -> str:
            result = prune(engine, before=month, export=Path(folder) / "pruned.jsonl.gz", fmt="jsonl", actor="bench")
            size = (Path(folder) / "pruned.jsonl.gz").stat().st_size
            return f"{result.records:,} records, {size / 1e6:,.0f} MB gzipped, {result.kept_older} kept"

        timed("prune --before (30 days: export, delete)", prune_month)
        timed("audit verify after the prune", audit)
        after_prune = report(engine, prices, by=["team", "day"], since=None, until=END)
        same = [row.to_json() for row in before_prune] == [row.to_json() for row in after_prune]
        print(f"{'report --by team,day unchanged by prune':<42} {same}")
        engine.dispose()
    return 0 if same else 3


if __name__ == "__main__":
    sys.exit(main())
