"""A fleet of developers behind spendgate: SDK clients sending what Claude Code sends (its session and agent
headers, its `metadata.user_id` blob), on two replicas of one PostgreSQL ledger (one replica on SQLite), under a
daily and a monthly window per developer and per team. No window is overrun, and what the ledger says each user
and session spent is what their records cost."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import anthropic
from anthropic.types import MessageParam
from sqlalchemy import Engine

from proxy.ledger.end_users import list_users, set_user_budget
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.reports import report
from proxy.ledger.teams import TeamSettings, create_team, get_team
from proxy.ledger.windows import WindowChange
from proxy.pricing.table import PriceTable
from proxy.types import Windows
from tests.conftest import POSTGRES_URL
from tests.replicas import replicas
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

# A prompt whose byte bound (~3,100 tokens) covers the 406 input tokens the fake upstream reports: a worst case of
# about $0.0131 on Sonnet 4.6, an actual cost of $0.001968.
LONG: list[MessageParam] = [{"role": "user", "content": "x" * 3000}]
DEVELOPERS = 6
SESSIONS = 2
CALLS = 8
# Each developer's day fits about 8 calls' spend; the team's day about 30 of the fleet's 96 calls.
USER_WINDOWS: Windows = {"day": Decimal("0.03"), "month": Decimal("0.05")}
TEAM_WINDOWS: Windows = {"day": Decimal("0.07"), "month": Decimal("0.5")}


def device(developer: int) -> str:
    return f"{developer:02d}" + "d" * 62


def test_a_fleet_under_day_and_month_windows(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(
        engine,
        "fleet",
        TeamSettings(windows=dict(TEAM_WINDOWS), user_windows=dict(USER_WINDOWS)),
        actor="test",
    )
    # Developer 5's month is the tighter of their windows.
    tight: Windows = {"day": Decimal(1), "month": Decimal("0.02")}
    set_user_budget(engine, "fleet", device(5), WindowChange(windows=dict(tight)), actor="test")
    _, key = create_key(engine, "fleet", actor="test")
    count = 1 if POSTGRES_URL is None else 2
    statuses: dict[str, list[int]] = defaultdict(list)
    lock = threading.Lock()

    def session(url: str, developer: int, number: int) -> None:
        session_id = f"session-{developer}-{number}"
        user_id = json.dumps({"device_id": device(developer), "account_uuid": "", "session_id": session_id})
        headers = {"x-claude-code-session-id": session_id, "x-claude-code-agent-id": f"agent-{number}"}
        with anthropic.Anthropic(base_url=url, api_key=key, max_retries=0) as client:
            for _ in range(CALLS):
                try:
                    client.messages.create(
                        model="claude-sonnet-4-6",
                        max_tokens=100,
                        messages=LONG,
                        metadata={"user_id": user_id},
                        extra_headers=headers,
                    )
                    status = 200
                except anthropic.APIStatusError as exc:
                    status = exc.status_code
                with lock:
                    statuses[device(developer)].append(status)

    upstream = FakeAnthropic()
    with serve_in_thread(upstream) as upstream_url, replicas(db_url, upstream_url, tmp_path, count) as urls:
        threads = [
            threading.Thread(target=session, args=(urls[(developer + number) % count], developer, number))
            for developer in range(DEVELOPERS)
            for number in range(SESSIONS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads)
        total = DEVELOPERS * SESSIONS * CALLS
        wait_until(lambda: sum(1 for _ in iter_usage(engine)) == total, f"{total} usage records")
    records = [record for _, record in iter_usage(engine)]
    assert {status for codes in statuses.values() for status in codes} == {200, 402}
    assert sum(codes.count(200) for codes in statuses.values()) == len(upstream.requests)

    spent: dict[str, Decimal] = defaultdict(Decimal)
    by_session: dict[str, Decimal] = defaultdict(Decimal)
    for record in records:
        # The stable part of Claude Code's metadata is the user; its session header the session.
        assert record["user"] in {device(developer) for developer in range(DEVELOPERS)}
        assert record["session"].startswith(f"session-{int(record['user'][:2])}-")
        assert record["agent"] == f"agent-{record['session'][-1]}"
        cost = Decimal(record["cost_usd"])
        spent[record["user"]] += cost
        by_session[record["session"]] += cost
    team_spent = sum(spent.values(), Decimal(0))

    # No window overrun: everyone's spend (all today, so in both the day and the month) within every window.
    assert team_spent <= min(TEAM_WINDOWS.values())
    for developer in range(DEVELOPERS):
        windows = tight if developer == 5 else USER_WINDOWS
        assert spent[device(developer)] <= min(windows.values())
    # The counters say what the records say: per user and window, and for the team.
    users = {view.user: view for view in list_users(engine, "fleet")}
    for user, amount in spent.items():
        assert {window.period: window.spent_usd for window in users[user].windows} == {"day": amount, "month": amount}
        assert all(window.reserved_usd == 0 for window in users[user].windows)
    team = get_team(engine, "fleet")
    assert {window.period: window.spent_usd for window in team.windows} == {"day": team_spent, "month": team_spent}
    # Per-session spend as `spendgate report --by session` totals it.
    rows = report(engine, PriceTable.load(), by=["session"])
    assert {row.group["session"]: row.cost_usd for row in rows} == dict(by_session)
    assert sum(row.calls for row in rows) == len(records)
