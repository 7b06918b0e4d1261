"""A usage record's fields are listed once, by `UsageRecord`: every list derived from it agrees, the lists kept apart
on purpose (the ORM's and the admin API's typed ones) match it, and the frozen ones (the audit hash's, the crash
journal's line) neither change nor miss a field by accident."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.ledger.audit import (
    GENESIS,
    USAGE_HASHED,
    USAGE_HASHED_ALL,
    USAGE_HASHED_NAMED,
    content_hash,
    extend,
    usage_hashed_values,
)
from proxy.ledger.commit import record_to_row
from proxy.ledger.disk import encode, record_from_json, record_to_json
from proxy.ledger.export import PUBLIC_FIELDS
from proxy.ledger.journal import END_FIELDS, Journal, Start, record_from_values, start_from_values
from proxy.ledger.schema import UsageRow
from proxy.surfaces import admin_models
from proxy.types import PUBLIC_COLUMNS, ROW_COLUMNS, Counter, Hold, Usage, UsageRecord
from tests.test_writer import make_record

# Columns a new field may be left out of on purpose, each with why. Empty: every column is hashed and journaled.
# A field added to `UsageRecord` fails the tests below until it is hashed (appended to `USAGE_HASHED_WHEN_SET`) or
# named in `UNHASHED`, and journaled (appended to `END_FIELDS`, old lines still read) or named in `UNJOURNALED`.
UNHASHED: frozenset[str] = frozenset()
UNJOURNALED: frozenset[str] = frozenset()
# Columns of the ledger's table that are not the record's: its order, its audit chain, a reprice's correction.
LEDGER_ONLY = {
    "seq",
    "content_hash",
    "chain_pos",
    "chain_hash",
    "repriced_cost_usd",
    "repriced_price_version",
    "repriced_by",
}


def full_record() -> UsageRecord:
    """A record with every field set (a lone surrogate in a label, as clients can send)."""
    usage = Usage(
        input_tokens=1,
        output_tokens=2,
        cache_creation_5m_input_tokens=3,
        cache_creation_1h_input_tokens=4,
        cache_read_input_tokens=5,
        web_search_requests=6,
        web_fetch_requests=7,
        service_tier="standard",
        speed="fast",
        inference_geo="us",
    )
    counter = Counter(
        scope="team:r:day",
        label="team r",
        period="day",
        period_start=datetime(2026, 11, 20, tzinfo=UTC),
        budget_usd=Decimal(5),
    )
    return make_record(
        id="sgr_full",
        feature="f\ud800x",
        user="u",
        session="s\ud800",
        agent="a",
        parent_agent="p",
        usage=usage,
        cost_source="estimate",
        is_retry=True,
        retry_reason="sdk",
        retry_of="sgr_prev",
        retry_count=2,
        attempt=1,
        fingerprint="ab" * 32,
        batch_id="b1",
        custom_id="c1",
        max_tokens_requested=100,
        max_tokens_sent=50,
        hold=Hold(call_id="sgr_full", counters=(counter,), amount=Decimal("0.5"), held=True, lease="l1"),
        retry_window_seconds=30,
    )


def test_the_ledger_table_has_the_records_columns_in_its_order() -> None:
    columns = [column.name for column in UsageRow.__table__.columns if column.name not in LEDGER_ONLY]
    assert columns == list(ROW_COLUMNS)


def test_the_admin_api_model_gives_the_exported_fields_in_their_order() -> None:
    """The pydantic model states each field's JSON type for the OpenAPI document, so it lists them itself."""
    assert tuple(admin_models.UsageRecord.model_fields) == PUBLIC_FIELDS
    assert PUBLIC_FIELDS[: len(PUBLIC_COLUMNS)] == PUBLIC_COLUMNS
    assert set(ROW_COLUMNS) - set(PUBLIC_COLUMNS) == {"fingerprint"}


def test_a_row_and_a_spill_line_carry_every_column_and_read_back() -> None:
    record = full_record()
    assert tuple(record_to_row(record)) == ROW_COLUMNS
    assert record_from_json(json.loads(encode(record_to_json(record)))) == record


def test_every_column_is_hashed_unless_left_out_on_purpose() -> None:
    assert len(set(USAGE_HASHED_ALL)) == len(USAGE_HASHED_ALL)
    assert not UNHASHED & set(USAGE_HASHED_ALL)
    assert set(USAGE_HASHED_ALL) | UNHASHED == set(ROW_COLUMNS)


def without_sessions(record: UsageRecord) -> UsageRecord:
    """The record as a version before sessions wrote it."""
    return replace(record, session=None, agent=None, parent_agent=None)


def test_the_hash_of_a_record_never_changes() -> None:
    """Pinned: a hash that changed would break the verification of every chain already written (the first two
    are from before sessions: their hash stays)."""
    records = [make_record(), without_sessions(full_record()), full_record()]
    rows = [record_to_row(record) for record in records]
    extend(rows, 0, GENESIS)
    assert [row["content_hash"] for row in rows] == [
        "89fb4cf6a501d86752039cf806bfba8a1ddfec5c444bd1cc78cb97a3f0b5d765",
        "9644a1239c2cec195b49ba16e436837b0d19561c3f8c63980ac37e04a94e3145",
        "f329829517fbc1a8e9ea08cb87494bd79a61a5f9fc17c918b2b8fb70c7da4d12",
    ]
    assert USAGE_HASHED_ALL[len(USAGE_HASHED) :] == ("cost_source", "session", "agent", "parent_agent")


def test_a_value_moved_to_another_column_hashed_when_set_changes_the_hash() -> None:
    """Columns hashed only when set are named in the hash: the same value under another one's name is an edit."""

    def hashed(**fields: Any) -> str:
        row = record_to_row(make_record(**fields))
        return content_hash(usage_hashed_values([row[name] for name in USAGE_HASHED_ALL]))

    placements = [{"cost_source": "estimate"}, *({name: "estimate"} for name in USAGE_HASHED_NAMED)]
    assert len({hashed(**placement) for placement in placements}) == len(placements)


def test_every_column_is_journaled_unless_left_out_on_purpose() -> None:
    assert len(set(END_FIELDS)) == len(END_FIELDS)
    assert not UNJOURNALED & set(END_FIELDS)
    assert set(END_FIELDS) | UNJOURNALED == set(ROW_COLUMNS)


# An end line as the version before sessions wrote it (full_record's, without its session columns).
LINE_BEFORE_SESSIONS = (
    '["e","sgr_full","2026-11-20T12:00:00+00:00","2026-11-20T12:00:01+00:00","research","key_1","f\\ud800x",'
    '"u","/v1/messages","claude-sonnet-4-6","claude-sonnet-4-6","req_1",200,"ok",null,false,"0.00045",'
    '"2026-09-01","table","estimate",true,"sdk","sgr_prev",2,1,'
    '"abababababababababababababababababababababababababababababababab","b1","c1",100,50,12.5,3.25,'
    '1,2,3,4,5,6,7,"standard","fast","us",'
    '["sgr_full","0.5",true,[["team:r:day","team r","day","2026-11-20T00:00:00+00:00","5"]],"l1"],30]\n'
)


def test_a_journal_line_never_changes_and_reads_back(tmp_path: Path) -> None:
    """Pinned: a process replays the journals that processes of an earlier version left behind."""
    journal = Journal(tmp_path, "x")
    journal.ended(full_record())
    journal.close()
    (path,) = tmp_path.glob("journal-x.*.jsonl")
    line = path.read_text()
    assert line == LINE_BEFORE_SESSIONS.replace('"us",', '"us","s\\ud800","a","p",')
    assert record_from_values(json.loads(line)[1:]) == full_record()
    # Lines from before columns were appended read back with those columns at their defaults.
    assert record_from_values(json.loads(LINE_BEFORE_SESSIONS)[1:]) == without_sessions(full_record())
    *columns, held, window = json.loads(LINE_BEFORE_SESSIONS)[1:]
    older = record_from_values([*columns[:-1], held, window])
    assert older == without_sessions(replace(full_record(), usage=replace(full_record().usage, inference_geo=None)))


def test_a_start_line_never_changes_and_reads_back(tmp_path: Path) -> None:
    """Pinned like an end line: a start line of the version before sessions still reads, its session unknown."""
    start = Start(
        id="sgr_s",
        started_at=datetime(2026, 11, 20, 12, 0, tzinfo=UTC),
        team="research",
        key_id="key_1",
        feature="f",
        user="u",
        endpoint="/v1/messages",
        model="claude-sonnet-4-6",
        streamed=True,
        max_tokens=100,
        input_bound=500,
        held=Decimal("0.5"),
        metered=True,
        session="s",
        agent="a",
        parent_agent="p",
    )
    journal = Journal(tmp_path, "x")
    journal.started(start)
    (path,) = tmp_path.glob("journal-x.*.jsonl")
    line = path.read_text()
    journal.close(keep=True)
    before = (
        '["s","sgr_s","2026-11-20T12:00:00+00:00","research","key_1","f","u","/v1/messages","claude-sonnet-4-6",'
        'true,100,500,"0.5",true'
    )
    assert line == before + ',"s","a","p"]\n'
    assert start_from_values(json.loads(line)[1:]) == start
    unknown = start._replace(session=None, agent=None, parent_agent=None)
    assert start_from_values(json.loads(before + "]")[1:]) == unknown
