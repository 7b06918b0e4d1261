"""A usage record's fields are listed once, by `UsageRecord`: every list derived from it agrees, the lists kept apart
on purpose (the ORM's and the admin API's typed ones) match it, and the frozen ones (the audit hash's, the crash
journal's line) neither change nor miss a field by accident."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from proxy.ledger.audit import GENESIS, USAGE_HASHED, USAGE_HASHED_ALL, extend
from proxy.ledger.commit import record_to_row
from proxy.ledger.disk import encode, record_from_json, record_to_json
from proxy.ledger.export import PUBLIC_FIELDS
from proxy.ledger.journal import END_FIELDS, Journal, record_from_values
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


def test_the_hash_of_a_record_never_changes() -> None:
    """Pinned: a hash that changed would break the verification of every chain already written."""
    rows = [record_to_row(make_record()), record_to_row(full_record())]
    extend(rows, 0, GENESIS)
    assert [row["content_hash"] for row in rows] == [
        "89fb4cf6a501d86752039cf806bfba8a1ddfec5c444bd1cc78cb97a3f0b5d765",
        "9644a1239c2cec195b49ba16e436837b0d19561c3f8c63980ac37e04a94e3145",
    ]
    assert USAGE_HASHED_ALL[len(USAGE_HASHED) :] == ("cost_source",)


def test_every_column_is_journaled_unless_left_out_on_purpose() -> None:
    assert len(set(END_FIELDS)) == len(END_FIELDS)
    assert not UNJOURNALED & set(END_FIELDS)
    assert set(END_FIELDS) | UNJOURNALED == set(ROW_COLUMNS)


def test_a_journal_line_never_changes_and_reads_back(tmp_path: Path) -> None:
    """Pinned: a process replays the journals that processes of an earlier version left behind."""
    journal = Journal(tmp_path, "x")
    journal.ended(full_record())
    journal.close()
    (path,) = tmp_path.glob("journal-x.*.jsonl")
    line = path.read_text()
    assert line == (
        '["e","sgr_full","2026-11-20T12:00:00+00:00","2026-11-20T12:00:01+00:00","research","key_1","f\\ud800x",'
        '"u","/v1/messages","claude-sonnet-4-6","claude-sonnet-4-6","req_1",200,"ok",null,false,"0.00045",'
        '"2026-09-01","table","estimate",true,"sdk","sgr_prev",2,1,'
        '"abababababababababababababababababababababababababababababababab","b1","c1",100,50,12.5,3.25,'
        '1,2,3,4,5,6,7,"standard","fast","us",'
        '["sgr_full","0.5",true,[["team:r:day","team r","day","2026-11-20T00:00:00+00:00","5"]],"l1"],30]\n'
    )
    assert record_from_values(json.loads(line)[1:]) == full_record()
    # A line from before the last column was appended reads back with that column at its default.
    *columns, held, window = json.loads(line)[1:]
    older = record_from_values([*columns[:-1], held, window])
    assert older == replace(full_record(), usage=replace(full_record().usage, inference_geo=None))
