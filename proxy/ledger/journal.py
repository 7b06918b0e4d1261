"""The crash journal: every call that goes upstream leaves a line before it goes and a line when it ends.

A process appends to its own files, `journal-<instance>.<segment>.jsonl` under `SPENDGATE_SPILL_DIR`, named by
an id made at start (not the pid: in containers every replica is pid 1), and holds an advisory lock on
`journal-<instance>.lock` while it lives. Each line is one `write()` to a file opened with O_APPEND, so it is in
the kernel's page cache when the call goes on: it survives the process being killed (SIGKILL, OOM), though not
the machine losing power (that would need an `fsync` per line; see docs/durability.md).

A process that starts replays the journals of processes that are gone (`proxy/ledger/journal_replay.py`). A
segment is deleted once every call started in it has ended and every record ended in it is in the ledger.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from proxy.ledger.disk import record_from_json
from proxy.logs import Trouble
from proxy.types import Counter, Usage, UsageRecord, column_getter

logger = logging.getLogger("spendgate")
# A segment is closed and a new one begun past this size, so finished calls stop costing disk.
SEGMENT_BYTES = 8 * 1024 * 1024


class Start(NamedTuple):
    """What the journal keeps of a call as it goes upstream: enough for a record and a worst-case estimate.
    (A named tuple: built on every call's path, and a tuple is the cheapest immutable record Python makes.)"""

    id: str
    started_at: datetime
    team: str | None
    key_id: str | None
    feature: str | None
    user: str | None
    endpoint: str
    model: str | None
    streamed: bool
    max_tokens: int | None
    input_bound: int  # bytes of the request body: no token is shorter than a byte
    held: Decimal | None  # the budget hold taken for it, if any
    metered: bool
    # Appended since, with defaults: a start line of an earlier version lacks them.
    session: str | None = None
    agent: str | None = None
    parent_agent: str | None = None


@dataclass(slots=True)
class _Segment:
    path: Path
    open_calls: set[str] = field(default_factory=set)
    unwritten: set[str] = field(default_factory=set)
    closed: bool = False


class Journal:
    """This process's journal."""

    def __init__(self, directory: Path, instance: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._instance = instance
        self._lock_fd = os.open(directory / f"journal-{instance}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._segments: dict[int, _Segment] = {}
        self._started_in: dict[str, int] = {}
        self._ended_in: dict[str, int] = {}
        self._number = 0
        self._leases: list[list[Any]] = []
        # End lines not yet written: (call id, line).
        self._held: list[tuple[str, str]] = []
        self._fd = -1
        self._size = 0
        self.failing: str | None = None
        # Logged when writing starts and stops failing, not once per line lost or call refused meanwhile.
        self._trouble = Trouble(logger, f"writing the crash journal in {directory} (calls are refused meanwhile)")
        self._open_segment()

    def started(self, start: Start) -> None:
        """Note a call about to go upstream (raises OSError if the line cannot be written); end lines waiting to
        be written go in the same `write()`."""
        line = "s", *_start_values(start)
        try:
            self._write_lines([*(held for _, held in self._held), _encode(line)])
        except OSError as exc:
            self._failed(exc)
            raise
        self._note_ended()
        self._segments[self._number].open_calls.add(start.id)
        self._started_in[start.id] = self._number

    def leased(self, lease: str, counters: Sequence[Counter], at: datetime) -> None:
        """Note a budget lease of this process; never raises (`failing` says the journal is not keeping up). Every
        segment repeats the notes, so a replay finds each lease whose estimate it may have to correct."""
        entry = ["l", lease, at.isoformat(), [[c.scope, c.period_start.isoformat()] for c in counters]]
        self._leases.append(entry)
        try:
            self._write(entry)
        except OSError as exc:
            self._failed(exc)

    def ended(self, record: UsageRecord) -> None:
        """Note a call's final record, before it is queued for the ledger; never raises (the record is queued
        all the same, and `failing` says the journal is not keeping up).

        The line is written with the next start line or at the end of this turn of the event loop, whichever
        comes first: under load one `write()` carries many lines. Until then the call's start line is kept."""
        self._held.append((record.id, _encode(["e", *_record_values(record)])))
        if len(self._held) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._write_held)
            except RuntimeError:  # no loop: a replay or a test, write it now
                self._write_held()

    def _write_held(self) -> None:
        if not self._held:
            return
        try:
            self._write_lines([line for _, line in self._held])
        except OSError as exc:
            self._failed(exc)
        self._note_ended()

    def _failed(self, exc: OSError) -> None:
        self.failing = f"cannot write the crash journal in {self._directory}: {exc}"
        self._trouble.failed(exc)

    def _note_ended(self) -> None:
        """Bookkeeping for end lines just written (or lost: the records are queued all the same)."""
        held, self._held = self._held, []
        for call_id, _ in held:
            number = self._started_in.pop(call_id, None)
            if number is not None:
                self._segments[number].open_calls.discard(call_id)
            # The same record can end twice (a batch's results read again): only its newest line is waited for.
            earlier = self._ended_in.get(call_id)
            if earlier is not None:
                self._segments[earlier].unwritten.discard(call_id)
            self._segments[self._number].unwritten.add(call_id)
            self._ended_in[call_id] = self._number
            self._forget(number)
            self._forget(earlier)

    def committed(self, records: Sequence[UsageRecord]) -> None:
        """The ledger has these records (or set them aside): the journal may forget them."""
        self._write_held()
        touched = set()
        for record in records:
            number = self._ended_in.pop(record.id, None)
            if number is not None:
                self._segments[number].unwritten.discard(record.id)
                touched.add(number)
        for number in touched:
            self._forget(number)

    def close(self, *, keep: bool = False) -> None:
        """At a clean shutdown, after the writer drained: delete the segments nothing depends on (none with `keep`:
        a lease is still in the ledger, and the next start's replay must end it), then unlock."""
        self._write_held()
        for segment in self._segments.values():
            segment.closed = True
        for number in [] if keep else list(self._segments):
            self._forget(number)
        os.close(self._fd)
        if not self._segments:
            (self._directory / f"journal-{self._instance}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)

    def _write(self, entry: list[Any]) -> None:
        self._write_lines([_encode(entry)])

    def _write_lines(self, lines: list[str]) -> None:
        # Positional JSON of plain values, ASCII: the C encoder alone, a few microseconds per line.
        data = ("\n".join(lines) + "\n").encode("ascii")
        if self._size > SEGMENT_BYTES:
            # Before the write, so the lines land in the segment the caller then notes them in.
            self._segments[self._number].closed = True
            previous = self._number
            self._open_segment()
            self._forget(previous)
        if os.write(self._fd, data) != len(data):
            raise OSError(f"short write to the journal in {self._directory}")
        self.failing = None
        self._trouble.succeeded()
        self._size += len(data)

    def _open_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._number += 1
        path = self._directory / f"journal-{self._instance}.{self._number}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = 0
        self._segments[self._number] = _Segment(path)
        for entry in self._leases:
            self._write(entry)

    def _forget(self, number: int | None) -> None:
        segment = self._segments.get(number) if number is not None else None
        if segment is None or not segment.closed or segment.open_calls or segment.unwritten:
            return
        segment.path.unlink(missing_ok=True)
        del self._segments[number]  # type: ignore[arg-type]


# An end line: a record's columns in this order, then its hold and repeat window. Positional and frozen, not
# derived from `UsageRecord`: a process replays the journals of processes that died before an upgrade, so a new
# column is appended here, never inserted, and old lines must still read (tests/test_record_fields.py says which
# columns the line leaves out on purpose).
END_FIELDS = (
    "id",
    "started_at",
    "finished_at",
    "team",
    "key_id",
    "feature",
    "user",
    "endpoint",
    "model",
    "response_model",
    "upstream_request_id",
    "status",
    "outcome",
    "error_type",
    "streamed",
    "cost_usd",
    "price_version",
    "price_source",
    "cost_source",
    "is_retry",
    "retry_reason",
    "retry_of",
    "retry_count",
    "attempt",
    "fingerprint",
    "batch_id",
    "custom_id",
    "max_tokens_requested",
    "max_tokens_sent",
    "latency_ms",
    "ttfb_ms",
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
    "web_fetch_requests",
    "service_tier",
    "speed",
    "inference_geo",
    "session",
    "agent",
    "parent_agent",
)
# Every line is encoded on a call's path: one encoder made once (json.dumps with options makes one per call),
# ASCII-only, so lone surrogates from client data are escaped rather than unencodable.
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_end_values = column_getter(END_FIELDS)
_APPENDED_DEFAULTS = {
    item.name: item.default
    for item in (*fields(UsageRecord), *fields(Usage))
    if item.name in END_FIELDS and item.default is not MISSING
}
_START_AT, _HELD = Start._fields.index("started_at"), Start._fields.index("held")
# A start line has at least the fields without a default (those of the first version).
_START_REQUIRED = len(Start._fields) - len(Start._field_defaults)


def _start_values(start: Start) -> list[Any]:
    values = list(start)
    values[_START_AT] = start.started_at.isoformat()
    values[_HELD] = None if start.held is None else str(start.held)
    return values


def start_from_values(values: list[Any]) -> Start:
    """A start line's fields (after its kind) as the `Start` they were written from."""
    if not _START_REQUIRED <= len(values) <= len(Start._fields):
        raise ValueError(f"a start line has {len(values)} fields, not {_START_REQUIRED} to {len(Start._fields)}")
    values[_START_AT] = datetime.fromisoformat(values[_START_AT])
    values[_HELD] = None if values[_HELD] is None else Decimal(values[_HELD])
    return Start(*values)


def _record_values(record: UsageRecord) -> list[Any]:
    values: list[Any] = list(_end_values(record))
    values[_STARTED], values[_FINISHED] = record.started_at.isoformat(), record.finished_at.isoformat()
    values[_COST] = None if record.cost_usd is None else str(record.cost_usd)
    hold = record.hold
    held = None
    if hold is not None:
        counters = [
            [
                c.scope,
                c.label,
                c.period,
                c.period_start.isoformat(),
                None if c.budget_usd is None else str(c.budget_usd),
            ]
            for c in hold.counters
        ]
        held = [hold.call_id, str(hold.amount), hold.held, counters, hold.lease]
    return [*values, held, record.retry_window_seconds]


def record_from_values(values: list[Any]) -> UsageRecord:
    """An end line's fields (after its kind) as the record they were written from."""
    *columns, held, window = values
    if len(columns) > len(END_FIELDS):
        raise ValueError(f"an end line has {len(columns)} fields, more than {len(END_FIELDS)}")
    # A line of an earlier version lacks the columns appended since: they take their defaults (one without a
    # default makes the line unreadable, and its call is recorded at its estimate).
    data = {**_APPENDED_DEFAULTS, **dict(zip(END_FIELDS, columns, strict=False))}
    hold = None
    if held is not None:
        # Lines written before leases existed have no fifth element.
        call_id, amount, is_held, counters, *rest = held
        lease = rest[0] if rest else None
        hold = {
            "call_id": call_id,
            "amount": amount,
            "held": is_held,
            "lease": lease,
            "counters": [
                dict(zip(("scope", "label", "period", "period_start", "budget_usd"), c, strict=True)) for c in counters
            ],
        }
    return record_from_json({**data, "reservation": hold, "retry_window_seconds": window})


_STARTED, _FINISHED, _COST = (END_FIELDS.index(name) for name in ("started_at", "finished_at", "cost_usd"))
