"""`spendgate reconcile` against a fake Admin API serving what the fake upstream really answered."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, func, select

from proxy.app import create_app
from proxy.cli.main import main
from proxy.ledger.commit import insert_records
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.schema import ReconciledDay
from proxy.ledger.teams import TeamSettings, create_team
from proxy.pricing.table import PriceTable
from proxy.reconcile.anthropic import AdminClient, ReportError
from proxy.types import Usage, UsageRecord
from tests.admin_api import ADMIN_KEY, KEY_ID, FakeAdminAPI, Raw, Tamper
from tests.replicas import replica
from tests.servers import serve_in_thread
from tests.stack import Stack, running_stack, settings_for
from tests.test_cli import FORBIDDEN
from tests.test_faults import HEARTBEATS
from tests.test_limits_wire import Webhook
from tests.test_metrics import parse, total
from tests.test_writer import make_record
from tests.upstream import UPSTREAM_KEY, FakeAnthropic, fixture
from tests.waiting import wait_until

MESSAGE: dict[str, Any] = {"max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
USAGE = json.loads(fixture("message.json"))["usage"]


def reconcile(
    db_url: str, admin_url: str, *args: str, key_id: bool = True, as_upstream: bool = False
) -> tuple[int, dict[str, Any]]:
    """`spendgate reconcile ... --format json` against the fake Admin API at `admin_url` (named as the Admin
    API's own address, or `as_upstream`: the upstream's, which the Admin API shares by default)."""
    where = "SPENDGATE_UPSTREAM_URL" if as_upstream else "SPENDGATE_ANTHROPIC_ADMIN_URL"
    env = {**os.environ, "SPENDGATE_DB_URL": db_url, "SPENDGATE_ANTHROPIC_ADMIN_KEY": ADMIN_KEY, where: admin_url}
    if key_id:
        env["SPENDGATE_ANTHROPIC_API_KEY_ID"] = KEY_ID
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "reconcile", *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 4), done.stderr
    return done.returncode, json.loads(done.stdout)


def billed(call_id: str, at: datetime) -> UsageRecord:
    """A record of one call as the fake upstream answers it (406 in, 50 out, Sonnet 4.6)."""
    usage = Usage(input_tokens=406, output_tokens=50, service_tier="standard")
    return make_record(id=call_id, started_at=at, usage=usage, cost_usd=Decimal("0.001968"))


def today() -> tuple[str, str]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.isoformat(), (start + timedelta(days=1)).isoformat()


def drive(
    stack: Stack, models: tuple[str, ...] = ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-sonnet-4-6")
) -> None:
    with anthropic.Anthropic(base_url=stack.url, api_key=stack.key) as sdk:
        for model in models:
            sdk.messages.create(model=model, **MESSAGE)
    stack.idle()


def test_everything_through_the_proxy_reconciles_to_zero(engine: Engine, db_url: str, tmp_path: Path) -> None:
    since, until = today()
    with running_stack(engine, db_url, tmp_path) as stack:
        drive(stack)
        admin = FakeAdminAPI(stack.upstream.served)
        with serve_in_thread(admin) as admin_url:
            for by in ("hour", "day"):
                code, answer = reconcile(db_url, admin_url, "--since", since, "--until", until, "--by", by)
                assert (code, answer["differences"], answer["drift"]) == (0, [], False)
                assert answer["buckets"] == 2  # two models (today's buckets)
        # Every request answered 429 once (retry-after honoured), and paged one row at a time.
        assert admin.asked.count("/v1/organizations/analytics/usage") >= 3


def test_the_legacy_api_when_analytics_is_missing(engine: Engine, db_url: str, tmp_path: Path) -> None:
    since, until = today()
    with running_stack(engine, db_url, tmp_path) as stack:
        drive(stack)
        admin = FakeAdminAPI(stack.upstream.served, legacy_only=True)
        with serve_in_thread(admin) as admin_url:
            code, answer = reconcile(
                db_url, admin_url, "--since", since, "--until", until, "--by", "hour", as_upstream=True
            )
    assert (code, answer["differences"]) == (0, [])
    assert "/v1/organizations/usage_report/messages" in admin.asked and "/v1/organizations/cost_report" in admin.asked


def test_calls_that_bypassed_the_proxy_are_exact_drift(engine: Engine, db_url: str, tmp_path: Path) -> None:
    since, until = today()
    with running_stack(engine, db_url, tmp_path) as stack:
        drive(stack)
        # The same upstream key, used directly: Anthropic bills it, the ledger never saw it.
        direct = httpx.post(
            f"{stack.upstream_url}/v1/messages",
            json={"model": "claude-sonnet-4-6", **MESSAGE},
            headers={"x-api-key": UPSTREAM_KEY},
        )
        assert direct.status_code == 200
        with serve_in_thread(FakeAdminAPI(stack.upstream.served)) as admin_url:
            _, answer = reconcile(db_url, admin_url, "--since", since, "--until", until, "--by", "day")
    found = {(d["model"], d["measure"]): d for d in answer["differences"]}
    assert set(found) == {
        ("claude-sonnet-4-6", "input"),
        ("claude-sonnet-4-6", "output"),
        ("claude-sonnet-4-6", "cost_usd"),
    }
    assert Decimal(found[("claude-sonnet-4-6", "input")]["delta"]) == USAGE["input_tokens"]
    assert Decimal(found[("claude-sonnet-4-6", "output")]["delta"]) == USAGE["output_tokens"]
    one_call = PriceTable.load().price(
        model="claude-sonnet-4-6", usage=Usage(input_tokens=406, output_tokens=50), at=datetime.now(UTC)
    )
    assert Decimal(found[("claude-sonnet-4-6", "cost_usd")]["delta"]) == one_call.cost_usd
    assert all("did not go through spendgate" in d["cause"] for d in found.values())
    assert not any(d["final"] for d in found.values())  # today's bucket may still grow


def test_a_wrong_price_in_the_table_is_cost_drift_with_equal_tokens(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    since, until = today()
    wrong = tmp_path / "prices.toml"
    # Our table says Sonnet 4.6 output costs $16 per million; Anthropic bills $15.
    cells = "input = 3\noutput = 16\ncache_write_5m = 3.75\ncache_write_1h = 6\ncache_read = 0.30\nbatch_input = 1.50\n"
    wrong.write_text(f'[[version]]\nid = "2026-09-01"\n[version.models.claude-sonnet-4-6]\n{cells}batch_output = 8\n')
    with running_stack(engine, db_url, tmp_path, prices_path=wrong) as stack:
        drive(stack, ("claude-sonnet-4-6",))
        with serve_in_thread(FakeAdminAPI(stack.upstream.served)) as admin_url:
            _, answer = reconcile(db_url, admin_url, "--since", since, "--until", until)
    [difference] = answer["differences"]
    assert (difference["measure"], difference["model"]) == ("cost_usd", "claude-sonnet-4-6")
    assert Decimal(difference["delta"]) == Decimal(-50) / 1_000_000  # 50 output tokens at $1 per million too many
    assert "price table is wrong" in difference["cause"]


def test_an_interrupted_call_is_drift_past_the_tolerance(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """A replica killed mid-call: the reaper records it `interrupted` at its worst-case estimate, no tokens."""
    create_team(engine, "research", TeamSettings(), actor="test")
    at = datetime(2026, 11, 10, 14, 30, tzinfo=UTC)
    insert_records(
        engine,
        [
            billed("sgr_done", at),
            make_record(
                id="sgr_cut",
                started_at=at,
                usage=Usage(),
                outcome="interrupted",
                cost_source="estimate",
                cost_usd=Decimal("0.5"),
            ),
        ],
    )
    served = [(at, "claude-sonnet-4-6", USAGE), (at + timedelta(seconds=1), "claude-sonnet-4-6", USAGE)]
    with serve_in_thread(FakeAdminAPI(served)) as admin_url:
        code, answer = reconcile(db_url, admin_url, "--since", "2026-11-10", "--until", "2026-11-11", "--by", "hour")
        assert (
            reconcile(db_url, admin_url, "--since", "2026-11-10", "--until", "2026-11-11", "--tolerance", "1")[0] == 4
        )
    assert code == 4 and answer["drift"] is True
    found = {d["measure"]: d for d in answer["differences"]}
    assert Decimal(found["input"]["delta"]) == 406 and found["input"]["bucket"] == "2026-11-10T14:00:00+00:00"
    assert Decimal(found["cost_usd"]["delta"]) == Decimal("0.001968") - Decimal("0.5")
    assert all(d["final"] and "1 calls recorded as interrupted" in d["cause"] for d in found.values())


def test_a_late_bucket_is_reported_but_not_drift(engine: Engine, db_url: str, tmp_path: Path) -> None:
    since, until = today()
    with running_stack(engine, db_url, tmp_path) as stack:
        drive(stack, ("claude-sonnet-4-6",))
        admin = FakeAdminAPI(stack.upstream.served, late_after=stack.upstream.served[0][0])
        with serve_in_thread(admin) as admin_url:
            code, answer = reconcile(db_url, admin_url, "--since", since, "--until", until, "--by", "hour")
    assert code == 0 and answer["drift"] is False
    assert answer["differences"] and all("not final yet" in d["cause"] for d in answer["differences"])


def test_refusals_from_the_admin_api_are_errors(engine: Engine, db_url: str) -> None:
    env = {**os.environ, "SPENDGATE_DB_URL": db_url, "SPENDGATE_ANTHROPIC_ADMIN_KEY": "sk-ant-admin01-wrong"}
    with serve_in_thread(FakeAdminAPI([])) as admin_url:
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "reconcile", "--since", "2026-11-01", "--until", "2026-11-02"],
            env={**env, "SPENDGATE_ANTHROPIC_ADMIN_URL": admin_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1 and "answered 401" in done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "reconcile", "--since", "2026-11-01", "--until", "2026-11-02"],
        env={**os.environ, "SPENDGATE_DB_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "SPENDGATE_ANTHROPIC_ADMIN_KEY" in missing.stderr


def test_the_server_reconciles_final_days_once_across_replicas(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Two replicas with scheduled reconciliation and a fixed clock: each final day of the last week checked
    once, the drifted one alerted once, the outcome in the metrics and on the dashboard's ledger page."""

    create_team(engine, "research", TeamSettings(), actor="test")
    drifted = datetime(2026, 11, 10, 9, tzinfo=UTC)
    insert_records(
        engine,
        [
            billed("sgr_a", drifted),
            billed("sgr_b", drifted + timedelta(days=1)),
        ],
    )
    # Anthropic saw a second call on the 10th (it bypassed the proxy).
    served = [
        (drifted, "claude-sonnet-4-6", USAGE),
        (drifted, "claude-sonnet-4-6", USAGE),
        (drifted + timedelta(days=1), "claude-sonnet-4-6", USAGE),
    ]
    now = datetime(2026, 11, 12, 12, tzinfo=UTC)
    webhook = Webhook()
    with serve_in_thread(FakeAdminAPI(served)) as admin_url, serve_in_thread(webhook) as hook_url:
        settings = settings_for(
            db_url,
            "https://upstream.test",
            tmp_path,
            anthropic_admin_key=ADMIN_KEY,
            anthropic_admin_url=admin_url,
            anthropic_api_key_id=KEY_ID,
            reconcile_every_seconds=0.05,
            alert_webhook=hook_url,
            metrics_token="m",
            admin_token="a",
        )
        with (
            serve_in_thread(create_app(settings, clock=lambda: now)) as one,
            serve_in_thread(create_app(settings, clock=lambda: now)),
        ):

            def checked() -> int:
                with engine.connect() as connection:
                    query = select(func.count()).select_from(ReconciledDay).where(ReconciledDay.checked_at.is_not(None))
                    return int(connection.execute(query).scalar_one())

            wait_until(lambda: checked() == 7, "seven final days reconciled")
            wait_until(lambda: webhook.received, "the drift alert")
            samples = parse(httpx.get(f"{one}/metrics", headers={"authorization": "Bearer m"}).text)
    assert [alert["day"] for alert in webhook.received] == ["2026-11-10"]
    assert webhook.received[0]["event"] == "reconcile_drift"
    assert total(samples, "spendgate_reconcile_drifted") == 0  # the latest day, the 11th, agrees
    assert total(samples, "spendgate_reconcile_day_timestamp_seconds") == datetime(2026, 11, 11, tzinfo=UTC).timestamp()
    with engine.connect() as connection:
        rows = {row.day.date().isoformat(): row for row in connection.execute(select(ReconciledDay))}
    assert rows["2026-11-10"].drifted and not rows["2026-11-11"].drifted
    assert Decimal(rows["2026-11-10"].anthropic_cost_usd) - Decimal(rows["2026-11-10"].ledger_cost_usd) == Decimal(
        "0.001968"
    )


def test_a_killed_replica_shows_as_interrupted_drift(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """SIGKILL a replica with calls in flight: the survivor records them `interrupted` (no tokens, estimated
    cost), Anthropic bills them in full, and reconcile names the cause."""

    # A budget small enough for per-call holds: the survivor's reaper records each held call of the dead one.
    create_team(engine, "research", TeamSettings(budget_usd=Decimal("0.005")), actor="test")
    _, key = create_key(engine, "research", actor="test")
    upstream = FakeAnthropic()
    since, until = today()
    with serve_in_thread(upstream) as upstream_url:
        with (
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS) as (doomed, process),
            replica(db_url, upstream_url, tmp_path, env=HEARTBEATS),
        ):
            body = {"model": "claude-sonnet-4-6", **MESSAGE}
            hanging = {"x-api-key": key, "x-fake-hang": "1"}

            def call() -> None:
                with contextlib.suppress(httpx.HTTPError):  # the replica dies under it
                    httpx.post(f"{doomed}/v1/messages", json=body, headers=hanging, timeout=30)

            threads = [threading.Thread(target=call) for _ in range(2)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(upstream.requests) == 2, "both calls to reach the upstream")
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            wait_until(lambda: len(upstream.served) == 2, "Anthropic to answer both (and bill them)")

            def interrupted() -> list[dict[str, Any]]:
                return [r for _, r in iter_usage(engine) if r["outcome"] == "interrupted"]

            wait_until(lambda: len(interrupted()) == 2, "the survivor's records of the dead replica's calls")
            for thread in threads:
                thread.join(timeout=30)
    with serve_in_thread(FakeAdminAPI(upstream.served)) as admin_url:
        _, answer = reconcile(db_url, admin_url, "--since", since, "--until", until, "--by", "hour")
    found = {d["measure"]: d for d in answer["differences"]}
    assert Decimal(found["input"]["delta"]) == 2 * USAGE["input_tokens"]
    assert Decimal(found["output"]["delta"]) == 2 * USAGE["output_tokens"]
    assert all("calls recorded as interrupted" in d["cause"] for d in found.values())


def test_admin_api_answers_that_never_end_or_lie_are_errors() -> None:

    def looping(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [], "has_more": True, "next_page": "same"})

    def naive_time(request: httpx.Request) -> httpx.Response:
        row = {"starting_at": "2026-11-10T00:00:00", "group": {"model": "m"}, "usage": {"output_tokens": 1}}
        return httpx.Response(200, json={"data": [row], "has_more": False})

    def negative(request: httpx.Request) -> httpx.Response:
        row = {"starting_at": "2026-11-10T00:00:00Z", "group": {"model": "m"}, "usage": {"output_tokens": -7}}
        return httpx.Response(200, json={"data": [row], "has_more": False})

    waits: list[float] = []

    def throttled(request: httpx.Request) -> httpx.Response:
        if not waits:
            return httpx.Response(429, headers={"retry-after": "nan"}, json={"type": "error", "error": {}})
        return httpx.Response(200, json={"data": [], "has_more": False})

    since, until = datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 11, 11, tzinfo=UTC)
    for answer, problem in ((looping, "twice"), (naive_time, "unexpected"), (negative, "unexpected")):
        client = AdminClient(ADMIN_KEY, transport=httpx.MockTransport(answer), sleep=lambda _: None)
        with pytest.raises(ReportError, match=problem):
            client.usage(since, until, "day")
    client = AdminClient(ADMIN_KEY, transport=httpx.MockTransport(throttled), sleep=waits.append)
    assert client.usage(since, until, "day") == [] and waits == [1.0]  # a nonsense retry-after: our own backoff


HOSTILE_DAY = datetime(2026, 11, 10, 9, tzinfo=UTC)
PERIOD = ("--since", "2026-11-10", "--until", "2026-11-11")


@pytest.fixture
def hostile(engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAdminAPI]:
    """A ledger and a fake Admin API that agree on one call on 2026-11-10 (never throttling), the API made to lie by
    a test's `tamper`; `spendgate reconcile` run in this process asks it."""
    create_team(engine, "research", TeamSettings(), actor="test")
    insert_records(engine, [billed("sgr_hostile", HOSTILE_DAY)])
    admin = FakeAdminAPI([(HOSTILE_DAY, "claude-sonnet-4-6", USAGE)], throttled=True)
    with serve_in_thread(admin) as admin_url:
        monkeypatch.setenv("SPENDGATE_DB_URL", db_url)
        monkeypatch.setenv("SPENDGATE_ANTHROPIC_ADMIN_KEY", ADMIN_KEY)
        monkeypatch.setenv("SPENDGATE_ANTHROPIC_ADMIN_URL", admin_url)
        monkeypatch.setenv("SPENDGATE_ANTHROPIC_API_KEY_ID", KEY_ID)
        yield admin


def run_reconcile(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str, float]:
    """`spendgate reconcile` over the hostile day: exit status, stdout, stderr, and how long it took."""
    started = time.monotonic()
    code = main(["reconcile", *PERIOD, *argv])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - started


def at_first_row(kind: str, where: tuple[str, ...], value: Any) -> Tamper:
    """Put `value` at `where` in the first row of the analytics `kind` report (usage or cost)."""

    def tamper(path: str, page: dict[str, Any]) -> dict[str, Any] | Raw:
        if path.endswith(f"/analytics/{kind}") and page["data"]:
            holder = page["data"][0]
            for key in where[:-1]:
                holder = holder[key]
            holder[where[-1]] = value
        return page

    return tamper


def answering(raw: Raw) -> Tamper:
    return lambda path, page: raw


def assert_one_clear_line(err: str, *fragments: str) -> None:
    assert err.startswith("spendgate: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and not FORBIDDEN & set(err), err
    for fragment in fragments:
        assert fragment in err, err


ERROR_JSON = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
DEEP_ROW = b'{"data":[{"usage":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}]}"
EVIL_MESSAGE = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"no\\n\\u001b]52;c;ZXZpbA==\\u0007"}}'
)


@pytest.mark.parametrize(
    "tamper, fragments",
    [
        pytest.param(
            at_first_row("cost", ("cost", "amount"), "1e999999999"),
            ["cost page 1", "cost.amount"],
            id="cents-1e999999999",
        ),
        pytest.param(
            at_first_row("cost", ("cost", "amount"), "1e-999999999"),
            ["cost page 1", "cost.amount"],
            id="cents-1e-999999999",
        ),
        pytest.param(
            at_first_row("cost", ("cost", "amount"), "NaN"), ["cost page 1", "cost.amount"], id="cents-nan-text"
        ),
        pytest.param(
            at_first_row("cost", ("cost", "amount"), float("nan")), ["cost page 1", "cost.amount"], id="cents-nan"
        ),
        pytest.param(
            at_first_row("cost", ("cost", "amount"), "-Infinity"), ["cost page 1", "cost.amount"], id="cents-infinity"
        ),
        pytest.param(at_first_row("cost", ("cost", "amount"), [1]), ["cost page 1", "cost.amount"], id="cents-list"),
        pytest.param(
            at_first_row("cost", ("cost", "currency"), "EUR"), ["cost page 1", "cost.currency"], id="currency"
        ),
        pytest.param(
            at_first_row("usage", ("usage", "output_tokens"), -7),
            ["usage page 1", "usage.output_tokens"],
            id="tokens-negative",
        ),
        pytest.param(
            at_first_row("usage", ("usage", "output_tokens"), 10**30),
            ["usage page 1", "usage.output_tokens"],
            id="tokens-absurd",
        ),
        pytest.param(
            at_first_row("usage", ("usage", "output_tokens"), float("inf")),
            ["usage page 1", "usage.output_tokens"],
            id="tokens-infinity",
        ),
        pytest.param(
            at_first_row("usage", ("usage", "output_tokens"), True),
            ["usage page 1", "usage.output_tokens"],
            id="tokens-bool",
        ),
        pytest.param(
            at_first_row("usage", ("usage", "output_tokens"), "50"),
            ["usage page 1", "usage.output_tokens"],
            id="tokens-text",
        ),
        pytest.param(at_first_row("usage", ("group", "model"), 5), ["usage page 1", "group.model"], id="model-number"),
        pytest.param(
            at_first_row("usage", ("starting_at",), "9999-12-31T23:00:00Z"),
            ["usage page 1", "starting_at"],
            id="bucket-year-9999",
        ),
        pytest.param(
            at_first_row("usage", ("starting_at",), "2026-11-10T00:00:00"),
            ["usage page 1", "starting_at"],
            id="bucket-naive",
        ),
        pytest.param(
            answering(Raw(body=b"[" * 100_000 + b"]" * 100_000)), ["usage page 1", "nested"], id="nested-page"
        ),
        pytest.param(answering(Raw(body=DEEP_ROW)), ["usage page 1", "nested"], id="nested-row"),
        pytest.param(answering(Raw(body=b"<html>\n<b>\x1b[2Jdown</b>")), ["usage page 1", "not JSON"], id="not-json"),
        pytest.param(answering(Raw(body=b'{"data": 5}')), ["usage page 1", "'data'"], id="data-not-a-list"),
        pytest.param(answering(Raw(body=b"[1]")), ["usage page 1"], id="page-not-an-object"),
        pytest.param(
            answering(Raw(body=b'{"data": [], "has_more": "maybe"}')), ["usage page 1", "has_more"], id="has-more"
        ),
        pytest.param(
            answering(Raw(status=400, body=EVIL_MESSAGE)),
            ["usage page 1", "answered 400", "no\\n\\x1b]52;"],
            id="error-text-escaped",
        ),
        pytest.param(
            answering(Raw(status=429, body=ERROR_JSON, headers=((b"retry-after", b"86400"),))),
            ["usage page 1", "answered 429", "86400 s", "60 s"],
            id="retry-after-a-day",
        ),
        pytest.param(
            answering(Raw(body=b" " * 1024 * 1024, repeat=40)), ["usage page 1", "bytes"], id="endless-answer"
        ),
        pytest.param(
            answering(Raw(body=b"garbage", headers=((b"content-encoding", b"gzip"),))),
            ["usage page 1", "cannot be decoded"],
            id="bad-gzip",
        ),
    ],
)
def test_a_hostile_admin_api_answer_is_one_clear_line(
    hostile: FakeAdminAPI, capsys: pytest.CaptureFixture[str], tamper: Tamper, fragments: list[str]
) -> None:
    hostile.tamper = tamper
    code, out, err, took = run_reconcile(capsys)
    assert (code, out) == (1, "")
    assert_one_clear_line(err, "/v1/organizations/analytics/", *fragments)
    assert took < 30  # never waits minutes, whatever it is asked to


HOSTILE_VALUES = st.one_of(
    st.integers() | st.integers(min_value=10**14),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=30),
    st.builds(
        lambda mantissa, exponent: f"{mantissa}e{exponent}",
        st.integers(-(10**6), 10**6),
        st.integers(-(10**12), 10**12),
    ),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
HOSTILE_FIELDS = st.sampled_from(
    [
        ("cost", ("cost", "amount")),
        ("cost", ("cost", "currency")),
        ("cost", ("group", "service_tier")),
        ("cost", ("starting_at",)),
        ("usage", ("usage", "uncached_input_tokens")),
        ("usage", ("usage", "cache_creation", "ephemeral_5m_input_tokens")),
        ("usage", ("usage", "server_tool_use", "web_search_requests")),
        ("usage", ("usage", "cache_creation")),
        ("usage", ("group", "model")),
        ("usage", ("starting_at",)),
    ]
)


@pytest.mark.any_dialect
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=HOSTILE_FIELDS, value=HOSTILE_VALUES, form=st.sampled_from(["table", "csv", "json"]))
def test_any_value_in_an_answer_is_reconciled_or_refused_in_one_line(
    hostile: FakeAdminAPI, capsys: pytest.CaptureFixture[str], field: tuple[str, tuple[str, ...]], value: Any, form: str
) -> None:
    """A value reconcile can use gives a short report with nothing raw for the terminal; any other is refused in
    one line naming the report, page and field. Never a traceback, never a hang."""
    kind, where = field
    hostile.tamper = at_first_row(kind, where, value)
    code, out, err, took = run_reconcile(capsys, "--format", form)
    assert took < 30
    if code == 1:
        assert_one_clear_line(err, f"/v1/organizations/analytics/{kind} page 1", where[-1])
    else:
        assert code in (0, 4) and err == ""
        assert len(out) < 20_000 and not FORBIDDEN & set(out)


def test_model_names_from_the_admin_api_are_shown_escaped(
    hostile: FakeAdminAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile.tamper = at_first_row("usage", ("group", "model"), "\x1b]52;c;ZXZpbA==\x07\u202eevil")
    code, out, err, _ = run_reconcile(capsys)
    assert (code, err) == (4, "") and not FORBIDDEN & set(out)
    assert "\\x1b]52;c;ZXZpbA==\\x07\\u202eevil" in out
    code, out, _, _ = run_reconcile(capsys, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 4 and "\\x1b]52;c;ZXZpbA==\\x07\\u202eevil" in {row["model"] for row in rows}


def test_retries_wait_a_minute_at_most_in_all() -> None:
    since, until = datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 11, 11, tzinfo=UTC)
    waits: list[float] = []
    # Nobody listening: every attempt fails to connect, with the backoff between them (31 s in all).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nobody = AdminClient(ADMIN_KEY, base_url=f"http://127.0.0.1:{port}", sleep=waits.append)
    with pytest.raises(ReportError, match="cannot reach the Admin API"):
        nobody.usage(since, until, "day")
    assert waits == [1, 2, 4, 8, 16]
    busy = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    admin = FakeAdminAPI([], throttled=True, tamper=answering(Raw(status=529, body=busy)))
    with serve_in_thread(admin) as admin_url:
        client = AdminClient(ADMIN_KEY, base_url=admin_url, sleep=waits.append)
        waits.clear()
        with pytest.raises(ReportError, match="page 1 answered 529: overloaded_error: busy$"):
            client.usage(since, until, "day")
        assert waits == [1, 2, 4, 8, 16]
        # Asked for 50 s twice: the second wait would pass the minute, so it is not taken.
        admin.tamper = answering(Raw(status=429, body=ERROR_JSON, headers=((b"retry-after", b"50"),)))
        waits.clear()
        with pytest.raises(ReportError, match="waiting 50 s more as its retry-after asks would pass the 60 s"):
            client.usage(since, until, "day")
        assert waits == [50]
