"""Rate limits: Anthropic's token-bucket model, exact across replicas, answered like Anthropic's own 429s."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, delete, text

from proxy.gateway.leases.rate import RateLeases
from proxy.instruments import Metrics
from proxy.ledger.db import write_transaction
from proxy.ledger.export import iter_usage
from proxy.ledger.instances import register
from proxy.ledger.key_admin import create_key, update_key
from proxy.ledger.keys import KeyInfo
from proxy.ledger.rates import Exchange, Limit, drop_leases, exchange
from proxy.ledger.schema import Instance
from proxy.ledger.teams import TeamSettings, create_team
from proxy.types import RateLimits
from tests.conftest import POSTGRES_URL
from tests.replicas import replicas
from tests.servers import serve_in_thread
from tests.stack import running_stack
from tests.test_limits_wire import table_gone
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

T0 = datetime(2026, 11, 30, 12, tzinfo=UTC)
HELLO: list[MessageParam] = [{"role": "user", "content": "Hello"}]
# A prompt whose byte bound (~3,100 tokens) covers the 406 input tokens the fake upstream reports.
LONG: list[MessageParam] = [{"role": "user", "content": "x" * 3000}]
# The window the concurrency proof checks (seconds), configurable for slower machines.
WINDOW = float(os.environ.get("SPENDGATE_TEST_RATE_WINDOW", "2"))


def within(total: float, per_minute: int, seconds: float) -> bool:
    """The token bucket's bound: what a window of `seconds` may admit."""
    return total <= per_minute * (1 + seconds / 60) + 1e-9


def windows(events: list[tuple[datetime, int]], span: float) -> list[tuple[datetime, int]]:
    """For every event, the total of the events in the `span` seconds starting at it."""
    events = sorted(events)
    totals = []
    for start, _ in events:
        end = start + timedelta(seconds=span)
        totals.append((start, sum(amount for at, amount in events if start <= at <= end)))
    return totals


def admitted_within(calls: list[tuple[datetime, datetime, int]], span: float) -> int:
    """The most that `span` seconds surely admitted: a call (arrived at spendgate, arrived upstream, amount) was
    admitted between its two arrivals, so it counts in a window holding both. (A call admitted after waiting for
    another's exchange may take what the bucket refilled after it arrived: windows of arrival at spendgate alone
    would count it early.)"""
    worst = 0
    for start, _, _ in calls:
        end = start + timedelta(seconds=span)
        worst = max(worst, sum(amount for came, went, amount in calls if start <= came and went <= end))
    return worst


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    per_minute=st.integers(1, 600),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which process
            st.floats(0, 20, allow_nan=False),  # seconds since the previous step
            st.integers(0, 700),  # how much it asks for
            st.integers(0, 100),  # % of its lease its calls consume now
            st.integers(0, 100),  # % of the rest it gives back
            st.booleans(),  # it dies (the reaper drops its lease)
        ),
        max_size=30,
    ),
)
def test_the_shared_bucket_never_admits_more_than_it_refills(
    engine: Engine, per_minute: int, steps: list[tuple[int, float, int, int, int, bool]]
) -> None:
    """Any interleaving of processes taking, consuming, giving back and dying: what is consumed in any window of T
    seconds stays within N x (1 + T/60)."""
    limit = Limit(scope=f"team:{uuid.uuid4().hex[:12]}:rpm", label="l", kind="requests", per_minute=per_minute)
    now, held = T0, [0, 0, 0]
    names = [f"p{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    for name in names:
        register(engine, name, now)
    consumed: list[tuple[datetime, int]] = []
    for process, seconds, want, consume, back_share, dies in steps:
        now += timedelta(seconds=seconds)
        used = held[process] * consume // 100
        held[process] -= used
        consumed.append((now, used))
        if dies:
            # Reaped, as the heartbeat reaper does; the process comes back as a new one with nothing.
            with write_transaction(engine) as connection:
                connection.execute(delete(Instance).where(Instance.id == names[process]))
                drop_leases(connection, [names[process]], now)
            names[process] = f"p{process}-{uuid.uuid4().hex[:8]}"
            register(engine, names[process], now)
            held[process] = 0
            continue
        back = held[process] * back_share // 100
        held[process] -= back
        item = Exchange(limit=limit, held=held[process], give_back=back, need=min(want, 1), want=want)
        [taken] = exchange(engine, names[process], [item], now)
        assert 0 <= taken.granted <= want and not taken.forfeited
        held[process] += taken.granted
    # Whatever is still held may be consumed at the end.
    consumed.append((now, sum(held)))
    for span in (0.0, 1.0, 10.0, 60.0, 3600.0):
        for start, total in windows(consumed, span):
            assert within(total, per_minute, span), (start, span, total)


def test_a_burst_then_a_429_the_sdk_waits_out_and_retries(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """60 requests a minute: a burst passes the bucket's 60 (plus what refilled while it ran, one a second), then
    a 429 with retry-after and the rate-limit headers; the SDK waits what retry-after says and its retry (flagged)
    succeeds."""
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(rpm=60)) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            passed, started = 0, time.monotonic()
            with pytest.raises(anthropic.RateLimitError) as refused:
                for _ in range(1_000):
                    answer = client.messages.with_raw_response.create(
                        model="claude-sonnet-4-6", max_tokens=10, messages=HELLO
                    )
                    passed += 1
            # The token bucket's bound, however slow the machine: its capacity plus the refill meanwhile.
            assert 60 <= passed <= 60 + (time.monotonic() - started) + 1
            assert answer.headers["x-spendgate-ratelimit-requests-limit"] == "60"
            assert int(answer.headers["x-spendgate-ratelimit-requests-remaining"]) <= 1
            assert answer.headers["x-spendgate-ratelimit-requests-reset"].endswith("Z")
        headers = refused.value.response.headers
        assert refused.value.type == "rate_limit_error"
        assert headers["x-spendgate-error"] == "rate_limited"
        assert "x-should-retry" not in headers
        assert 1 <= int(headers["retry-after"]) <= 2
        assert "team research's requests per minute (60)" in refused.value.message
        assert headers["x-spendgate-ratelimit-requests-remaining"] == "0"
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=2) as client:
            # A busy machine can take a second to send the next call, and the bucket refills one a second: until the
            # SDK had to retry, empty the bucket again and try again.
            for _ in range(5):
                started = time.monotonic()
                response = client.messages.with_raw_response.create(
                    model="claude-sonnet-4-6", max_tokens=10, messages=HELLO
                )
                waited = time.monotonic() - started
                if response.retries_taken:
                    break
                with pytest.raises(anthropic.RateLimitError):
                    for _ in range(1_000):
                        client.with_options(max_retries=0).messages.create(
                            model="claude-sonnet-4-6", max_tokens=10, messages=HELLO
                        )
            assert response.retries_taken >= 1
        stack.idle()
        records = [record for _, record in iter_usage(stack.engine)]
    assert len(stack.upstream.requests) == len([r for r in records if r["status"] == 200])
    refusals = [record for record in records if record["status"] == 429]
    assert [r["error_type"] for r in refusals] == ["rate_limited"] * len(refusals)
    assert records[-1]["status"] == 200 and records[-1]["is_retry"] and records[-1]["retry_reason"] == "sdk"
    # The SDK waited (at least most of) a retry-after, never shorter than a second, before the attempt that passed.
    assert waited >= 0.9 * 1 - 0.5


def test_a_call_larger_than_the_limit_is_refused_for_good(engine: Engine, db_url: str, tmp_path: Path) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(otpm=1000)) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key) as client:
            with pytest.raises(anthropic.RateLimitError) as refused:
                client.messages.create(model="claude-sonnet-4-6", max_tokens=1001, messages=HELLO)
            client.messages.create(model="claude-sonnet-4-6", max_tokens=1000, messages=HELLO)
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in refused.value.response.headers
        assert "more than team research's output tokens per minute (1000)" in refused.value.message
        # The SDK obeyed x-should-retry: one refused request, one admitted, nothing retried.
        assert [record["status"] for record in stack.records(2)] == [429, 200]


def test_tokens_unused_by_a_call_are_given_back(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """Output tokens are bounded by max_tokens and input tokens by the body before the call, then corrected by
    the usage: the fake upstream answers 406 input and 50 output tokens, so 20 calls of max_tokens 1000 pass
    under 3,000 output tokens a minute (at their bound, only 3 would), and a key's own limit binds too."""
    team = TeamSettings(otpm=3000, itpm=200_000)
    with running_stack(engine, db_url, tmp_path, team=team, key_cache_seconds=0.2) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            for _ in range(20):
                client.messages.create(model="claude-sonnet-4-6", max_tokens=1000, messages=LONG)
            update_key(engine, stack.key_id, actor="test", rpm=1)
            # The key cache keeps the old rules for its lifetime (0.2 s here): the new one binds soon after.
            with pytest.raises(anthropic.RateLimitError) as refused:
                wait_until(
                    lambda: client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=LONG) and False,
                    "the key's new limit to bind",
                )
        assert f"key {stack.key_id}'s requests per minute (1)" in refused.value.message


def test_rate_limits_hold_across_replicas_under_load(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """200 SDK clients on two replicas (PostgreSQL; one on SQLite), half of them streaming, call as fast as the
    limits let them, obeying retry-after through the SDK: in every window of T seconds, the requests, input tokens
    and output tokens the ledger shows admitted stay within limit x (1 + T/60)."""
    rpm, itpm, otpm = 120, 60_000, 4_000
    create_team(engine, "research", TeamSettings(itpm=itpm, otpm=otpm), actor="test")
    _, key = create_key(engine, "research", actor="test", rates=RateLimits(rpm=rpm))
    upstream = FakeAnthropic()
    count = 1 if POSTGRES_URL is None else 2
    clients = 200
    outcomes: list[int] = []
    lock = threading.Lock()
    # The load runs for 4 windows from the moment every client is ready (making 200 SDK clients takes seconds on a
    # busy machine), and on until the limits have refused some attempt, however slowly this machine sends them.
    deadline = [0.0, 0.0]
    refused_once = threading.Event()

    def start_clock() -> None:
        now = time.monotonic()
        deadline[:] = [now + 4 * WINDOW, now + 120]

    ready = threading.Barrier(clients + 1, action=start_clock)

    def going() -> bool:
        now = time.monotonic()
        return now < deadline[1] and (now < deadline[0] or not refused_once.is_set())

    def seen(response: Any) -> None:
        if response.status_code == 429:
            refused_once.set()

    def client(url: str, stream: bool) -> None:
        # Every attempt's answer, including the 429s the SDK then waits out and retries.
        http = anthropic.DefaultHttpxClient(event_hooks={"response": [seen]})
        with anthropic.Anthropic(base_url=url, api_key=key, max_retries=3, http_client=http) as sdk:
            ready.wait()
            while going():
                try:
                    # One id for the call's attempts, echoed by the upstream into the record of the one admitted.
                    tag = {"x-fake-request-id": f"req_{uuid.uuid4().hex}"}
                    if stream:
                        with sdk.messages.stream(
                            model="claude-sonnet-4-6", max_tokens=60, messages=LONG, extra_headers=tag
                        ) as events:
                            events.until_done()
                    else:
                        sdk.messages.create(model="claude-sonnet-4-6", max_tokens=60, messages=LONG, extra_headers=tag)
                    status = 200
                except anthropic.APIStatusError as exc:
                    status = exc.status_code
                with lock:
                    outcomes.append(status)

    # This proves the limits, not how long a burst of 200 calls waits for the ledger on a crowded machine (past
    # the default 5 s, a call is answered 503 and never goes out).
    patient = {"SPENDGATE_LEDGER_WAIT_SECONDS": "60"}
    with (
        serve_in_thread(upstream) as upstream_url,
        replicas(db_url, upstream_url, tmp_path, count, env=patient) as urls,
    ):
        threads = [threading.Thread(target=client, args=(urls[n % count], n // count % 2 == 1)) for n in range(clients)]
        for thread in threads:
            thread.start()
        ready.wait(timeout=120)
        for thread in threads:
            thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)
    assert set(outcomes) <= {200, 429}
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT started_at, status, error_type, input_tokens, cache_creation_5m_input_tokens, "
                "cache_creation_1h_input_tokens, output_tokens, retry_count, upstream_request_id FROM usage_records"
            )
        ).all()
    admitted = [row for row in rows if row.status != 429]
    refused = [row for row in rows if row.status == 429]
    assert {row.status for row in admitted} == {200}
    assert {row.error_type for row in refused} == {"rate_limited"}
    assert refused, "the limits were never reached: the test proves nothing"
    # The SDK retried refused calls after their retry-after, and those retries are flagged.
    assert any(row.retry_count > 0 for row in rows)
    assert len(upstream.requests) == len(admitted)
    arrived = {seen.headers["x-fake-request-id"]: seen.arrived for seen in upstream.requests}
    assert len(arrived) == len(admitted)
    times = [(_aware(row.started_at), arrived[row.upstream_request_id]) for row in admitted]
    requests = [(came, went, 1) for came, went in times]
    inputs = [
        (came, went, row.input_tokens + row.cache_creation_5m_input_tokens + row.cache_creation_1h_input_tokens)
        for (came, went), row in zip(times, admitted, strict=True)
    ]
    outputs = [(came, went, row.output_tokens) for (came, went), row in zip(times, admitted, strict=True)]
    span = (max(went for _, went in times) - min(came for came, _ in times)).total_seconds()
    # A window counts only the calls surely admitted in it, so on a crowded machine (calls waiting seconds for the
    # ledger) the short ones see few: the half-run and whole-run windows still see most or all.
    for seconds in (WINDOW / 2, WINDOW, span / 2, span):
        for calls, limit in ((requests, rpm), (inputs, itpm), (outputs, otpm)):
            worst = admitted_within(calls, seconds)
            assert within(worst, limit, seconds), (limit, seconds, worst)
    # Not over-strict either: the burst alone lets through most of a minute's requests or output tokens.
    assert len(admitted) >= min(rpm, otpm // 60) // 2


def _aware(value: datetime | str) -> datetime:
    """A timestamp as the raw SQL gives it (text on SQLite, naive UTC on PostgreSQL), as aware UTC."""
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def rate_leased(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT COALESCE(SUM(amount), 0) FROM rate_leases")).scalar_one())


def test_idle_leases_go_back_to_the_bucket(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """A replica gives back what it holds once its calls stop, so another replica can use the whole limit."""
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(rpm=600)) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            for _ in range(30):
                client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)

        wait_until(lambda: rate_leased(engine) == 0, "the idle lease given back")
        with engine.connect() as connection:
            level = connection.execute(text("SELECT level FROM rate_buckets")).scalar_one()
        # 30 consumed, the rest back: the level is what a full bucket less 30 has refilled since.
        assert Decimal(str(level)) >= Decimal(600 - 30)


@pytest.mark.parametrize("fail_open", [False, True], ids=["fails-closed", "fail-open"])
def test_a_ledger_that_does_not_answer_is_a_503_not_a_pass(
    engine: Engine, db_url: str, tmp_path: Path, fail_open: bool
) -> None:
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(rpm=600), budget_fail_open=fail_open) as stack:
        with (
            table_gone(engine, "rate_buckets"),
            anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client,
        ):
            if fail_open:
                client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
                assert len(stack.upstream.requests) == 1
                return
            with pytest.raises(anthropic.InternalServerError) as refused:
                client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["x-spendgate-error"] == "ledger_unavailable"
        assert stack.upstream.requests == []


def test_a_process_whose_lease_was_dropped_keeps_nothing_it_held(engine: Engine) -> None:
    """Taken for dead while it still ran: its lease was dropped as consumed, so its next exchange gives nothing
    back and keeps nothing, and the bucket never holds more than its capacity."""
    limit = Limit(scope="team:1:rpm", label="l", kind="requests", per_minute=60)
    register(engine, "alive", T0)
    [taken] = exchange(engine, "alive", [Exchange(limit=limit, held=0, need=60, want=60)], T0)
    assert taken.granted == 60 and taken.level == 0
    with write_transaction(engine) as connection:
        connection.execute(delete(Instance).where(Instance.id == "alive"))
        drop_leases(connection, ["alive"], T0)
    later = T0 + timedelta(seconds=30)
    item = Exchange(limit=limit, held=20, give_back=40, need=1, want=5)
    [taken] = exchange(engine, "alive", [item], later)
    # 30 s refilled 30; nothing of the 40 "given back" counts, and only what was granted now is held.
    assert taken.forfeited and taken.granted == 5 and taken.level == 25
    with engine.connect() as connection:
        assert connection.execute(text("SELECT amount FROM rate_leases")).scalar_one() == 5


def test_leases_of_processes_that_no_longer_exist_are_dropped(engine: Engine) -> None:
    """A clean exit that could not give its lease back leaves rows of an instance that is gone: the next reap
    drops them, so the bucket refills again."""
    limit = Limit(scope="team:1:rpm", label="l", kind="requests", per_minute=60)
    exchange(engine, "gone", [Exchange(limit=limit, held=0, need=60, want=60)], T0)
    with write_transaction(engine) as connection:
        drop_leases(connection, [], T0)
    later = T0 + timedelta(seconds=60)
    [taken] = exchange(engine, "other", [Exchange(limit=limit, held=0, need=60, want=60)], later)
    assert taken.granted == 60


@pytest.mark.anyio
async def test_the_upkeep_tops_leases_up_so_a_steady_load_waits_for_no_exchange(engine: Engine) -> None:
    """Each second's upkeep takes what the last second's demand needs, in the transaction it runs anyway: calls at
    the same pace then fit their leases and none waits for an exchange of its own."""
    register(engine, "steady", datetime.now(UTC))
    metrics = Metrics()
    rates = RateLeases(engine, instance="steady", metrics=metrics)
    key = KeyInfo(key_id="key_1", team_id=1, team="t", team_rates=RateLimits(rpm=10**9, itpm=10**9, otpm=10**9))

    async def a_second_of_calls() -> None:
        for _ in range(200):
            ticket = await rates.admit(key, input_tokens=50, output_tokens=20, at=datetime.now(UTC))
            assert ticket is not None
            rates.finished(ticket, input_tokens=40, output_tokens=20)

    def exchanges() -> float:
        return (
            metrics.registry.get_sample_value("spendgate_ledger_round_trips_total", {"operation": "rate_exchange"}) or 0
        )

    await a_second_of_calls()
    await rates.upkeep()
    synced = exchanges()
    await a_second_of_calls()
    assert exchanges() == synced
    await rates.close()


def test_what_a_call_really_used_decides_what_goes_back(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """An error answer used no tokens; a stream cut off before its end may have used all its max_tokens (the model
    goes on without the client), so nothing of its output bound goes back; an input bound above the whole limit
    takes the bucket and is corrected by the real input."""
    team = TeamSettings(otpm=1000, itpm=1000)
    with running_stack(engine, db_url, tmp_path, team=team) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            with pytest.raises(anthropic.APIStatusError):
                client.messages.create(
                    model="claude-sonnet-4-6", max_tokens=1000, messages=HELLO, extra_headers={"x-fake-status": "529"}
                )
            # Nothing used: the whole output bucket is still there.
            client.messages.create(model="claude-sonnet-4-6", max_tokens=900, messages=LONG)
        body = {"model": "claude-sonnet-4-6", "max_tokens": 900, "stream": True, "messages": HELLO}
        slow = {"x-api-key": stack.key, "x-fake-chunk": "100", "x-fake-delay": "0.05"}
        # The answer above used 50 output tokens: 950 are back. A stream cut after its first bytes keeps its 900.
        with httpx.stream("POST", f"{stack.url}/v1/messages", json=body, headers=slow) as cut:
            next(cut.iter_bytes())
        stack.records(3)
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            with pytest.raises(anthropic.RateLimitError):
                client.messages.create(model="claude-sonnet-4-6", max_tokens=200, messages=HELLO)
            client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)


def test_a_budget_upkeep_waiting_on_a_lock_holds_up_no_rate_lease(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """One upkeep keeps both kinds of lease: while the budget give-back waits for an operator's lock on the budget
    tables, idle rate leases still go back to their buckets (other replicas would be refused meanwhile)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one write lock for every table")
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(rpm=600, budget_usd=Decimal(100))) as stack:
        with anthropic.Anthropic(base_url=stack.url, api_key=stack.key, max_retries=0) as client:
            for _ in range(30):
                client.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=HELLO)
        stack.idle()
        assert rate_leased(engine) > 0
        with engine.connect() as locker:
            locker.exec_driver_sql("LOCK TABLE budget_counters, budget_holds IN EXCLUSIVE MODE")
            wait_until(lambda: rate_leased(engine) == 0, "the idle rate leases given back")
            locker.rollback()
