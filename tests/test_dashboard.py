"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against a real `spendgate serve`.

Screenshots of every page at desktop and phone widths go to `build/screenshots/` (not committed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from hypothesis import given, strategies as st
from playwright.sync_api import Browser, Page
from sqlalchemy import Engine

from proxy.app import create_app
from proxy.ledger.commit import insert_records
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.reports import report
from proxy.ledger.teams import TeamSettings, create_team
from proxy.pricing.table import PriceTable
from proxy.surfaces.dashboard.forecast import forecast
from proxy.types import Period
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.stack import settings_for
from tests.test_writer import make_record
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "dashboard-admin-token"
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


class Visit:
    """A browser page that records every request it makes."""

    def __init__(self, browser: Browser, base: str, size: str = "desktop") -> None:
        self.base = base
        self.context = browser.new_context(viewport=SIZES[size], accept_downloads=True)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.requested: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))

    def sign_in(self, token: str = TOKEN) -> None:
        self.page.goto(f"{self.base}/dashboard")
        assert self.page.url == f"{self.base}/dashboard/sign-in"
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")

    def shoot(self, name: str, size: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}-{size}.png"), full_page=True)

    def close(self) -> None:
        elsewhere = [url for url in self.requested if not url.startswith(self.base + "/")]
        self.context.close()
        assert elsewhere == [], f"pages asked another host: {elsewhere}"


def cli(db_url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        env={**os.environ, "SPENDGATE_DB_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


@pytest.fixture
def served(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[str]:
    """`spendgate serve` with two teams fed by real SDK calls through the fake upstream."""
    rules = TeamSettings(budget_usd=Decimal(25), user_budget_usd=Decimal(5), rpm=1000, otpm=90_000)
    create_team(engine, "research", rules, actor="test")
    create_team(engine, "ops", TeamSettings(), actor="test")
    _, research = create_key(engine, "research", actor="test", name="ci")
    _, ops = create_key(engine, "ops", actor="test")
    env = {"SPENDGATE_ADMIN_TOKEN": TOKEN}
    with serve_in_thread(FakeAnthropic()) as upstream, replica(db_url, upstream, tmp_path, env=env) as (url, _):
        for key, feature in ((research, "search"), (research, "summarise"), (ops, "triage")):
            headers = {"x-spendgate-feature": feature, "x-spendgate-user": "alice"}
            with anthropic.Anthropic(base_url=url, api_key=key, max_retries=2, default_headers=headers) as sdk:
                sdk.messages.create(
                    model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "a"}]
                )
                with sdk.messages.stream(
                    model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "b"}]
                ) as stream:
                    stream.until_done()
                sdk.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=10,
                    messages=[{"role": "user", "content": feature}],  # the fake fails each body once
                    extra_headers={"x-fake-fail-first": "1"},
                )
        # Four records per client (the retried call is two): all written before any page is read.
        wait_until(lambda: len(list(iter_usage(engine))) == 12, "every call's record")
        yield url


def period_start() -> str:
    return datetime.now(UTC).date().replace(day=1).isoformat()


def test_sign_in_refuses_wrong_tokens_and_every_page_wants_a_session(served: str, browser: Browser) -> None:
    visit = Visit(browser, served)
    visit.sign_in("not-the-token")
    assert visit.page.get_by_test_id("sign-in-error").inner_text() == "That is not the admin token."
    for path in ("/dashboard", "/dashboard/teams/research", "/dashboard/ledger", "/dashboard/teams/ops/usage.csv"):
        answer = visit.page.request.get(f"{served}{path}", max_redirects=0)
        back = "" if path == "/dashboard" else f"?next={path}"
        assert (answer.status, answer.headers["location"]) == (303, f"/dashboard/sign-in{back}"), path
    visit.sign_in()
    assert visit.page.url == f"{served}/dashboard"
    cookie = next(c for c in visit.context.cookies() if c["name"] == "spendgate_session")
    # Lax, not Strict: the identity provider's redirect back is a cross-site navigation (every change is a POST
    # with the session's CSRF token, so Lax's top-level GETs change nothing).
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["expires"] > 0
    assert TOKEN not in cookie["value"] and all(TOKEN not in url for url in visit.requested)
    visit.page.click("text=Sign out")
    assert visit.page.url == f"{served}/dashboard/sign-in"
    visit.page.goto(f"{served}/dashboard/ledger")
    assert visit.page.url == f"{served}/dashboard/sign-in?next=/dashboard/ledger"
    visit.close()


def test_sign_in_attempts_are_rate_limited(served: str, browser: Browser) -> None:
    visit = Visit(browser, served)
    statuses = [
        visit.page.request.post(f"{served}/dashboard/sign-in", form={"token": "guess"}).status for _ in range(8)
    ]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429
    visit.close()


def test_pages_show_what_spendgate_report_says(served: str, db_url: str, browser: Browser) -> None:
    since = period_start()
    users = {user["user"]: user for user in json.loads(cli(db_url, "teams", "users", "research", "--format", "json"))}
    by_team = {
        row["team"]: row
        for row in json.loads(cli(db_url, "report", "--by", "team", "--since", since, "--format", "json"))
    }
    for size in SIZES:
        visit = Visit(browser, served, size)
        visit.sign_in()
        rows = visit.page.locator("[data-testid=teams] tbody tr")
        assert rows.count() == 2
        # Riskiest first: the team with a budget.
        assert rows.nth(0).get_attribute("data-team") == "research"
        for team in ("research", "ops"):
            spent = visit.page.locator(f"tr[data-team={team}] [data-field=spent]").get_attribute("data-usd")
            assert Decimal(spent or "") == Decimal(by_team[team]["cost_usd"]), team
        visit.shoot("overview", size)
        visit.page.click("text=research")
        totals = visit.page.get_by_test_id("totals")
        row = by_team["research"]
        assert Decimal(totals.locator("[data-field=spent]").get_attribute("data-usd") or "") == Decimal(row["cost_usd"])
        assert int(totals.locator("[data-field=calls]").get_attribute("data-value") or "") == row["calls"]
        assert int(totals.locator("[data-field=retries]").get_attribute("data-value") or "") == row["retries"]
        for field, key in (
            ("retry-cost", "retry_cost_usd"),
            ("cache-savings", "cache_savings_usd"),
            ("batch-savings", "batch_savings_usd"),
        ):
            assert Decimal(totals.locator(f"[data-field={field}]").get_attribute("data-usd") or "") == Decimal(row[key])
        assert visit.page.get_by_test_id("top-feature").locator("tbody tr").count() == 2
        assert "Rate limits: 1,000 requests, 90,000 output tokens per minute." in visit.page.inner_text("main")
        allowances = visit.page.get_by_test_id("user-allowances").locator("tbody tr")
        assert allowances.count() == len(users) == 1
        assert allowances.nth(0).locator("td").nth(0).inner_text() == "alice"
        spent = allowances.nth(0).locator("[data-label=Spent]").get_attribute("data-usd")
        assert Decimal(spent or "") == Decimal(users["alice"]["spent_usd"]) == Decimal(row["cost_usd"])
        assert visit.page.get_by_test_id("latest").locator("tbody tr").count() == row["calls"]
        assert visit.page.locator("[data-testid=daily-chart] svg rect").count() >= 1
        visit.shoot("team", size)
        visit.page.click("text=Ledger")
        assert visit.page.locator("[data-field=interrupted]").inner_text() == "0"
        visit.page.click("text=Verify the whole chain now")
        assert visit.page.locator("[data-field=verify]").inner_text().startswith("Intact")
        visit.shoot("ledger", size)
        visit.close()


def test_the_csv_is_what_spendgate_usage_exports(served: str, db_url: str, browser: Browser) -> None:
    visit = Visit(browser, served)
    visit.sign_in()
    visit.page.goto(f"{served}/dashboard/teams/research")
    with visit.page.expect_download() as download:
        visit.page.get_by_test_id("csv").click()
    downloaded = Path(download.value.path()).read_text()
    visit.close()
    since = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat()
    assert downloaded == cli(db_url, "usage", "--team", "research", "--since", since, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(downloaded)))
    assert len(rows) == 8 and {row["team"] for row in rows} == {"research"}


NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_the_forecast_date_under_a_fixed_clock(engine: Engine, db_url: str, tmp_path: Path, browser: Browser) -> None:
    """$4 a day for the last week and $2 this morning: $30 of a $50 budget spent, 10.5 days left in November."""
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(50)), actor="test")
    records = [
        make_record(id=f"sgr_{day}", started_at=datetime(2026, 11, day, 9, tzinfo=UTC), cost_usd=Decimal(4))
        for day in range(13, 20)
    ]
    records.append(make_record(id="sgr_today", started_at=NOW - timedelta(hours=3), cost_usd=Decimal(2)))
    records.append(
        make_record(id="sgr_october", started_at=datetime(2026, 10, 31, 9, tzinfo=UTC), cost_usd=Decimal(99))
    )
    insert_records(engine, records)
    app = create_app(settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN), clock=lambda: NOW)
    with serve_in_thread(app) as url:
        visit = Visit(browser, url)
        visit.sign_in()
        research = visit.page.locator("tr[data-team=research]")
        assert research.locator("[data-field=spent]").get_attribute("data-usd") == "30"
        # $20 left at $4 a day: five days from now; by December 1 at that rate, $30 + 10.5 × $4.
        assert research.locator("[data-field=run-out]").get_attribute("data-date") == "2026-11-25"
        assert research.locator("[data-field=projected]").inner_text().startswith("$72.00")
        visit.close()


@given(daily=st.decimals(min_value=Decimal("0.01"), max_value=Decimal(1000), places=2), room=st.integers(1, 10_000))
def test_a_steady_rate_is_forecast_exactly(daily: Decimal, room: int) -> None:
    history = {date(2026, 11, day): daily for day in range(1, 20)}
    history[NOW.date()] = daily / 2  # half of today, at noon
    spent = sum(history.values(), Decimal(0))
    start = datetime(2026, 11, 1, tzinfo=UTC)
    end = datetime(2026, 12, 1, tzinfo=UTC)
    outlook = forecast(
        history, spent=spent, held=Decimal(0), budget=spent + room, period_start=start, period_end=end, now=NOW
    )
    assert outlook.rate_usd_per_day == outlook.rate_low == outlook.rate_high == daily
    assert outlook.projected_usd == spent + daily * Decimal("10.5")
    expected = NOW + timedelta(days=float(room / daily))
    if expected < end:
        assert outlook.run_out is not None and abs(outlook.run_out - expected) < timedelta(seconds=1)
    else:
        assert outlook.run_out is None


def test_odd_cookies_and_parameters_are_refused_not_errors(engine: Engine, db_url: str, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    app = create_app(settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN))
    with TestClient(app) as client:
        for cookie in ("9999999999.\u00e9", "\u0661\u0662.x", "", "9999999999", "1.2.3"):
            raw = f"spendgate_session={cookie}".encode()  # as sent: bytes the client chose
            headers: dict[str, Any] = {"cookie": raw}
            answer = client.get("/dashboard", headers=headers, follow_redirects=False)
            assert (answer.status_code, answer.headers.get("location")) == (303, "/dashboard/sign-in"), cookie
        assert client.post("/dashboard/sign-in", data={"token": TOKEN}, follow_redirects=False).status_code == 303
        create_team(engine, "research", TeamSettings(), actor="test")
        assert client.get("/dashboard/teams/research/usage.csv", params={"since": "garbage"}).status_code == 400


def test_a_teams_top_sessions(engine: Engine, db_url: str, tmp_path: Path, browser: Browser) -> None:
    """The ten dearest sessions of the period, each as `spendgate report --by session` sums it, names shown as
    text: a session id is whatever a client sent."""
    create_team(engine, "research", TeamSettings(), actor="test")
    create_team(engine, "ops", TeamSettings(), actor="test")
    hostile = '<script>document.title="owned"</script>'
    records = [
        make_record(
            id=f"sgr_{n}_{call}",
            session=hostile if n == 11 else f"session-{n:02d}",
            user="ann" if call == 0 or n != 10 else "bob",
            started_at=NOW - timedelta(hours=n, minutes=call),
            cost_usd=Decimal(n) / 100,
        )
        for n in range(12)
        for call in range(2)
    ]
    records += [
        make_record(id="sgr_none", session=None, started_at=NOW, cost_usd=Decimal(50)),
        make_record(id="sgr_ops", team="ops", session="ops-session", started_at=NOW, cost_usd=Decimal(50)),
        make_record(
            id="sgr_old", session="october", started_at=datetime(2026, 10, 31, tzinfo=UTC), cost_usd=Decimal(50)
        ),
    ]
    insert_records(engine, records)
    app = create_app(settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN), clock=lambda: NOW)
    since = datetime(2026, 11, 1, tzinfo=UTC)
    sums = {
        row.group["session"]: row
        for row in report(engine, PriceTable.load(), by=["session"], since=since, team="research")
    }
    with serve_in_thread(app) as url:
        for size in SIZES:
            visit = Visit(browser, url, size)
            visit.sign_in()
            visit.page.goto(f"{url}/dashboard/teams/research")
            rows = visit.page.get_by_test_id("top-sessions").locator("tbody tr")
            shown = [[rows.nth(i).locator("td").nth(n).inner_text() for n in range(3)] for i in range(rows.count())]
            assert [session for session, _, _ in shown] == [hostile, *(f"session-{n:02d}" for n in range(10, 1, -1))]
            assert shown[0][1:] == ["ann", "2"] and shown[1][1:] == ["2 users", "2"]
            for i, (session, _, _) in enumerate(shown):
                cost = rows.nth(i).locator("[data-label=Cost]").get_attribute("data-usd")
                assert Decimal(cost or "") == sums[session].cost_usd
            assert rows.nth(0).locator("[data-label='Last seen']").inner_text() == "2026-11-20 01:00:00"
            assert visit.page.title() != "owned" and visit.page.locator("main script").count() == 0
            visit.page.get_by_test_id("top-sessions").scroll_into_view_if_needed()
            visit.shoot("team-sessions", size)
            visit.close()


def test_a_teams_budget_windows(engine: Engine, db_url: str, tmp_path: Path, browser: Browser) -> None:
    """Every window of a team with several: its allowance, spend, what is left, and when it resets."""
    windows: dict[Period, Decimal | None] = {"day": Decimal(20), "week": Decimal(90)}
    create_team(engine, "research", TeamSettings(budget_usd=Decimal(300), windows=windows), actor="test")
    app = create_app(settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN), clock=lambda: NOW)
    with serve_in_thread(app) as url:
        visit = Visit(browser, url)
        visit.sign_in()
        visit.page.goto(f"{url}/dashboard/teams/research")
        rows = visit.page.get_by_test_id("windows").locator("tbody tr")
        shown = {
            str(rows.nth(i).get_attribute("data-window")): (
                rows.nth(i).locator("[data-field=allowance]").get_attribute("data-usd"),
                rows.nth(i).locator("[data-field=resets]").inner_text(),
            )
            for i in range(rows.count())
        }
        visit.close()
    assert shown == {
        "daily": ("20", "2026-11-21 00:00 UTC"),
        "weekly": ("90", "2026-11-23 00:00 UTC"),
        "monthly": ("300", "2026-12-01 00:00 UTC"),
    }
