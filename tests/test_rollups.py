"""Rollups: what reports, budgets and the dashboard read instead of the records, kept by the writer, recounted by
`audit verify`, rebuilt by `spendgate rollups rebuild`, and filled from the records by the migration that adds them."""

from __future__ import annotations

import base64
import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import Engine, event, text

from proxy.cli.main import main
from proxy.ledger.commit import INSERTED, USAGE_TABLE, insert_records, record_to_row
from proxy.ledger.db import _alembic_config, insert_rows, make_engine, upgrade
from proxy.ledger.reports import report, report_page
from proxy.ledger.rollup_checks import disagreement
from proxy.ledger.rollup_reads import Span, spans, totals
from proxy.ledger.rollups import MONTHLY, ROLLUPS, binders
from proxy.ledger.schema import Money, UTCDateTime
from proxy.pricing.table import PriceTable
from proxy.types import GROUPS, Usage, UsageRecord
from tests.conftest import empty_database
from tests.test_writer import make_record

PRICES = PriceTable.load()
# Around a month's end, so reads cross whole months, whole days and parts of days.
BASE = datetime(2026, 10, 30, tzinfo=UTC)
_ids = itertools.count()

names = st.sampled_from(["a", "b", "ü", "None", ""]) | st.none()
# Orders that differ between collations: code point ("B" < "a" < "z" < "ü") and natural language ("a" < "B").
ordered_names = st.sampled_from(["a", "B", "z", "ü", "a b", "ab", "", "None", "\U0001f600"]) | st.none()
instants = st.integers(min_value=0, max_value=5 * 86400 - 1).map(lambda s: BASE + timedelta(seconds=s, microseconds=7))
costs = st.none() | st.decimals(min_value=0, max_value=5, places=9, allow_nan=False)


@st.composite
def records(draw: st.DrawFn, team: str, names: st.SearchStrategy[str | None] = names) -> UsageRecord:
    started = draw(instants)
    tier = draw(st.sampled_from(["standard", "batch", None]))
    return make_record(
        id=f"sgr_roll_{next(_ids)}",
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        team=team,
        key_id=draw(st.sampled_from(["key_1", "key_2", None])),
        feature=draw(names),
        user=draw(names),
        session=draw(names),
        agent=draw(names),
        model=draw(st.sampled_from(["claude-sonnet-4-6", "claude-haiku-4-5", None])),
        response_model=draw(st.sampled_from(["claude-sonnet-4-6", "claude-opus-4-8", None])),
        outcome=draw(st.sampled_from(["ok", "interrupted", "upstream_error"])),
        usage=Usage(
            input_tokens=draw(st.integers(0, 10**6)),
            output_tokens=draw(st.integers(0, 10**5)),
            cache_read_input_tokens=draw(st.integers(0, 10**6)),
            web_search_requests=draw(st.integers(0, 3)),
            service_tier=tier,
        ),
        cost_usd=draw(costs),
        price_source=draw(st.sampled_from(["table", "family", "unpriced"])),
        is_retry=draw(st.booleans()),
    )


def expected(
    chosen: list[UsageRecord], by: list[str], since: datetime | None, until: datetime | None
) -> dict[Any, Any]:
    """The totals a report must show, counted from the records themselves."""
    found: dict[tuple[str | None, ...], dict[str, Any]] = defaultdict(
        lambda: {"calls": 0, "cost": Decimal(0), "retries": 0, "retry_cost": Decimal(0), "input": 0}
    )
    for record in chosen:
        if (since is not None and record.started_at < since) or (until is not None and record.started_at >= until):
            continue
        values = {
            "team": record.team,
            "model": record.model,
            "feature": record.feature,
            "user": record.user,
            "session": record.session,
            "agent": record.agent,
            "key": record.key_id,
            "day": record.started_at.date().isoformat(),
        }
        row = found[tuple(values[name] for name in by)]
        row["calls"] += 1
        row["cost"] += record.cost_usd or 0
        row["retries"] += record.is_retry
        row["retry_cost"] += (record.cost_usd or 0) if record.is_retry else 0
        row["input"] += record.usage.input_tokens
    return dict(found)


def shown(rows: list[Any], by: list[str]) -> dict[Any, Any]:
    return {
        tuple(row.group[name] for name in by): {
            "calls": row.calls,
            "cost": row.cost_usd,
            "retries": row.retries,
            "retry_cost": row.retry_cost_usd,
            "input": row.tokens["input_tokens"],
        }
        for row in rows
    }


bounds = st.none() | instants | instants.map(lambda t: t.replace(hour=0, minute=0, second=0, microsecond=0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reports_from_rollups_equal_a_count_of_the_records(engine: Engine, data: st.DataObject) -> None:
    """Whatever the records (NULLs in every group, unpriced calls, retries, batches) and however they arrive (in
    batches, out of time order), a report over any groups and any bounds (whole months, whole days, parts of days)
    totals exactly what the records hold, and the rollups agree with a recount."""
    team = f"team-{next(_ids)}"
    chosen = data.draw(st.lists(records(team), min_size=1, max_size=40))
    cut = data.draw(st.integers(0, len(chosen)))
    insert_records(engine, chosen[:cut])
    insert_records(engine, chosen[cut:])
    by = data.draw(st.lists(st.sampled_from(GROUPS), unique=True, max_size=3))
    since, until = data.draw(bounds), data.draw(bounds)
    rows = report(engine, PRICES, by=by, since=since, until=until, team=team)
    assert shown(rows, by) == expected(chosen, by, since, until)
    assert disagreement(engine) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(since=bounds, until=bounds, months=st.booleans())
def test_spans_cover_the_range_exactly_once(
    engine: Engine, since: datetime | None, until: datetime | None, months: bool
) -> None:
    """A read's range is cut into spans that meet end to end: month rows on whole months, day rows on whole days,
    records only inside one day."""
    with engine.connect() as connection:
        found = spans(connection, since, until, months=months)
    if since is not None and until is not None and since >= until:
        assert found == []
        return
    assert found[0].start == since and found[-1].end == until
    for before, after in itertools.pairwise(found):
        assert before.end == after.start is not None
    for span in found:
        if span.grain == "records":
            assert span.start is not None and span.end is not None
            assert (
                span.end - span.start <= timedelta(days=1)
                and span.start.date() == (span.end - timedelta(microseconds=1)).date()
            )
        elif span.grain == "day":
            assert midnight(span.start) and midnight(span.end)
        else:
            assert months and all(t is None or (midnight(t) and t.day == 1) for t in (span.start, span.end))


def midnight(instant: datetime | None) -> bool:
    return instant is None or instant == instant.replace(hour=0, minute=0, second=0, microsecond=0)


def same(value: Any) -> Any:
    return value


def test_binders_bind_as_the_column_types_do(engine: Engine) -> None:
    """The writer binds a rollup row's times and money itself (five per row); they must be what `UTCDateTime`
    and `Money` would bind, or the rows would not compare, sort or sum with the rest."""
    dialect = engine.dialect
    when, money = binders(dialect)
    time = UTCDateTime().dialect_impl(dialect).bind_processor(dialect) or same
    exact = Money().dialect_impl(dialect).bind_processor(dialect) or same
    elsewhere = timezone(timedelta(hours=-5))
    for instant in (BASE, BASE.replace(microsecond=1), datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=elsewhere)):
        assert when(instant) == time(instant)
    for amount in (None, Decimal(0), Decimal("0.000000015"), Decimal("1E-9"), Decimal("123456789.123456789")):
        assert money(amount) == exact(amount)


def test_tampered_rollups_are_caught_and_rebuilt(
    engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit verify` recounts the rollups: an edited total fails it (exit 3, naming the day and group); `spendgate
    rollups rebuild` recomputes them from the records, after which verify passes and reports read true again."""
    chosen = [make_record(id=f"sgr_t{n}", started_at=BASE + timedelta(hours=n * 7), team="t") for n in range(10)]
    insert_records(engine, chosen)
    before = [row.to_json() for row in report(engine, PRICES, by=["team", "day"])]
    with engine.begin() as connection:
        connection.execute(text("UPDATE rollup_users SET calls = calls + 1 WHERE grain = 'day'"))
    assert main(["audit", "verify", "--db", db_url]) == 3
    problem = capsys.readouterr().err
    assert "rollup rollup_users disagrees on the day of 2026-10-30" in problem and "calls" in problem
    assert main(["rollups", "rebuild", "--db", db_url]) == 0
    assert "rollups rebuilt" in capsys.readouterr().out
    assert main(["audit", "verify", "--db", db_url]) == 0
    assert "rollups agree" in capsys.readouterr().out
    assert [row.to_json() for row in report(engine, PRICES, by=["team", "day"])] == before


def test_a_ledger_with_records_gets_its_rollups_when_migrated(tmp_path: Path) -> None:
    """Upgrading a ledger of the release before fills the rollups from its records (the migration's own SQL), so
    reports are unchanged by the upgrade and verify passes."""
    with empty_database(tmp_path) as url:
        _migrate_with_records(url)


def _migrate_with_records(url: str) -> None:
    config = _alembic_config()
    engine = make_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0016")
    chosen = [
        make_record(
            id=f"sgr_m{n}",
            started_at=BASE + timedelta(hours=n * 5),
            team=f"t{n % 3}",
            user=[None, "ann", "None"][n % 3],
            session=None if n % 2 else f"s{n % 4}",
            cost_usd=None if n % 5 == 0 else Decimal(n) / 8,
            is_retry=n % 4 == 0,
        )
        for n in range(30)
    ]
    with engine.begin() as connection:
        rows = [record_to_row(record) for record in chosen]
        insert_rows(
            connection,
            USAGE_TABLE,
            [c for c in INSERTED if c in rows[0]],
            [[r[c] for c in INSERTED if c in r] for r in rows],
        )
    upgrade(url)
    rebuilt = make_engine(url)
    assert disagreement(rebuilt) is None
    for by in (["team", "day"], ["user"], ["session"], []):
        assert shown(report(rebuilt, PRICES, by=by), by) == expected(chosen, by, None, None)
    engine.dispose()
    rebuilt.dispose()


def test_report_queries_use_the_team_indexes(engine: Engine) -> None:
    """A team's pages read its rollup rows through each rollup's team index, never a scan of every team's rows:
    the plan of the very query `read` sends (EXPLAIN on a ledger of 40 teams, its statistics gathered)."""
    sqlite = engine.dialect.name == "sqlite"
    calls = [
        make_record(id=f"sgr_i{n}", started_at=BASE + timedelta(hours=n % 90), team=f"t{n % 40}", user=f"u{n % 97}")
        for n in range(2000)
    ]
    insert_records(engine, calls)
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        if not sqlite:
            connection.exec_driver_sql("SET enable_seqscan = off")
        for table in ROLLUPS:
            for grain in ("day", "month") if table.name in MONTHLY else ("day",):
                span = Span(BASE, None, grain)
                query = totals(span, table, ["model"], ["calls", "cost_usd"], sqlite, where={"team": "x"})
                sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
                plan = " ".join(
                    str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN {'QUERY PLAN ' * sqlite}{sql}")
                )
                assert f"ix_{table.name}_team" in plan, plan
        # The ledger page's all-time counts read the month rows alone.
        query = totals(Span(None, None, "month"), ROLLUPS[0], [], ["interrupted_calls"], sqlite)
        sql = str(query.compile(connection, compile_kwargs={"literal_binds": True}))
        plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN {'QUERY PLAN ' * sqlite}{sql}"))
        assert "ix_rollup_teams_grain" in plan, plan


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            "INSERT INTO rollup_teams SELECT day, grain, '0' || substr(group_key, 2), team, key_id, feature, model,"
            " priced_model, price_source, calls, input_tokens, output_tokens, cache_creation_5m_input_tokens,"
            " cache_creation_1h_input_tokens, cache_read_input_tokens, web_search_requests, cost_usd, retries,"
            " retry_cost_usd, unpriced_calls, family_priced_calls, batch_cost_usd, batch_web_search_requests,"
            " interrupted_calls, first_started_at, last_started_at FROM rollup_teams",
            id="every-row-twice",
        ),
        pytest.param(
            "UPDATE rollup_users SET day = day + interval '3 days' WHERE grain = 'day'",
            id="rows-moved-to-days-without-records",
        ),
    ],
)
def test_rollup_rows_no_record_accounts_for_are_caught(engine: Engine, tamper: str) -> None:
    """Rows a recount of the records never produces (a group under a second key, totals on a day with no calls)
    are caught, not just rows whose totals differ."""
    insert_records(engine, [make_record(id=f"sgr_x{n}", started_at=BASE + timedelta(hours=n)) for n in range(3)])
    if engine.dialect.name == "sqlite":
        tamper = tamper.replace("day + interval '3 days'", "datetime(day, '+3 days')")
    with engine.begin() as connection:
        connection.execute(text(tamper))
    assert disagreement(engine) is not None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_report_pages_join_into_the_whole_report(engine: Engine, data: st.DataObject) -> None:
    """Paged (any groups, bounds and page size), a report gives every row of the whole report once and in its
    order, NULL and empty groups and letters whose orders differ between collations included; each page's cursor
    leads to the next, and the last has none."""
    team = f"team-{next(_ids)}"
    chosen = data.draw(st.lists(records(team, names=ordered_names), max_size=40))
    insert_records(engine, chosen)
    by = data.draw(st.lists(st.sampled_from(GROUPS), unique=True, max_size=3))
    since, until = data.draw(bounds), data.draw(bounds)
    limit = data.draw(st.integers(1, 5))
    whole = [row.to_json() for row in report(engine, PRICES, by=by, since=since, until=until, team=team)]
    paged: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = report_page(engine, PRICES, by=by, limit=limit, cursor=cursor, since=since, until=until, team=team)
        assert len(page.rows) == limit if page.next_cursor else len(page.rows) <= limit
        paged += [row.to_json() for row in page.rows]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert paged == whole


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cursor=st.text(max_size=60) | st.binary(max_size=60).map(lambda raw: base64.urlsafe_b64encode(raw).decode()))
def test_a_cursor_no_report_gave_is_refused_as_such(engine: Engine, cursor: str) -> None:
    """Any text as a cursor is either a group of the report's width or a ValueError saying so, never another
    failure (a valid-looking group just starts the page after it)."""
    try:
        report_page(engine, PRICES, by=["session", "agent"], limit=3, cursor=cursor)
    except ValueError as error:
        assert "'cursor' is not one this report returned" in str(error)
    nul, surrogate = '["a", "\\u0000"]', '["\\ud800", null]'
    for wrong in ('["a"]', '["a", 1]', "{}", '["a", "b", "c"]', "[" * 5000 + "]" * 5000, nul, surrogate):
        with pytest.raises(ValueError, match="'cursor' is not one"):
            report_page(
                engine, PRICES, by=["session", "agent"], limit=3, cursor=base64.b64encode(wrong.encode()).decode()
            )


@pytest.mark.parametrize("by", ["session", "agent"])
def test_a_page_of_sessions_reads_its_groups_alone_through_their_index(engine: Engine, by: str) -> None:
    """A page of a report by session (or agent) finds its groups in order through the rollup's index on them,
    never totalling or sorting every group, and totals only its own: the plans of the very queries `report_page`
    sends (EXPLAIN on 600 sessions over three days, statistics gathered)."""
    calls = [
        make_record(
            id=f"sgr_p{n}", started_at=BASE + timedelta(hours=n % 72), session=f"s{n % 600}", agent=f"a{n % 600}"
        )
        for n in range(3000)
    ]
    insert_records(engine, calls)
    sent: list[tuple[str, Any]] = []

    def capture(connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "rollup_sessions" in statement:
            sent.append((statement, parameters))

    first = report_page(engine, PRICES, by=[by], limit=10, since=BASE, until=BASE + timedelta(days=2))
    event.listen(engine, "before_cursor_execute", capture)
    try:
        page = report_page(
            engine, PRICES, by=[by], limit=10, cursor=first.next_cursor, since=BASE, until=BASE + timedelta(days=2)
        )
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert [row.group[by] for row in page.rows] == sorted(f"{by[0]}{n}" for n in range(600))[10:20]
    sqlite = engine.dialect.name == "sqlite"
    assert len(sent) == 2
    with engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
        if not sqlite:
            connection.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in sent:
            explain = f"EXPLAIN {'QUERY PLAN ' * sqlite}{statement}"
            plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql(explain, parameters))
            assert f"ix_rollup_sessions_{by}" in plan, plan
        groups_plan = " ".join(
            str(row[-1])
            for row in connection.exec_driver_sql(f"EXPLAIN {'QUERY PLAN ' * sqlite}{sent[0][0]}", sent[0][1])
        )
        assert "TEMP B-TREE" not in groups_plan and "Sort" not in groups_plan, groups_plan
