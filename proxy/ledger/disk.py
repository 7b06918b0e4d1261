"""Usage records on disk, for when the ledger cannot take them: one JSON form, and the files that hold it.

- `unwritten-*.jsonl`: records the ledger could not take before shutdown (spilled), replayed by the next start;
- `refused-*.jsonl`: records the ledger refused as data, each with its reason, kept for `spendgate journal
  replay` once the cause is fixed;
- `journal-*.jsonl`: the crash journal (`proxy/ledger/journal.py`).

Files are written whole to a temporary name and renamed, so a full disk or a crash never leaves half a file
under a name that is replayed; replay goes line by line, and a line it cannot read is set aside with its reason,
never a reason not to start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from proxy.ledger.budgets import SoftLimitCrossed
from proxy.ledger.commit import DEFAULT_SOFT_FRACTION, insert_records, is_refused, record_to_row
from proxy.types import ROW_COLUMNS, USAGE_COLUMNS, Counter, Hold, Usage, UsageRecord

logger = logging.getLogger("spendgate")


def record_to_json(record: UsageRecord) -> dict[str, Any]:
    """A record as a JSON object (money and times as text), hold included."""
    data = record_to_row(record)
    # Under the name earlier versions gave it: their spill files must still replay.
    data["reservation"] = None if record.hold is None else asdict(record.hold)
    data["retry_window_seconds"] = record.retry_window_seconds
    return data


def encode(data: dict[str, Any]) -> str:
    """One JSONL line (no newline) for a record or journal entry."""
    return json.dumps(data, default=str, separators=(",", ":"))


def record_from_json(data: dict[str, Any]) -> UsageRecord:
    """The inverse of `record_to_json`; raises KeyError, TypeError or ValueError on a malformed object."""
    fields = {name: data[name] for name in ROW_COLUMNS if name in data}
    # Every token count must be there; the record's own fields with a default may be missing.
    usage = Usage(**{name: fields.pop(name) for name in USAGE_COLUMNS})
    for name in ("started_at", "finished_at"):
        fields[name] = datetime.fromisoformat(fields[name])
    if fields.get("cost_usd") is not None:
        fields["cost_usd"] = Decimal(fields["cost_usd"])
    held = data.get("reservation")
    hold = None
    if held is not None:
        counters = tuple(
            Counter(
                scope=c["scope"],
                label=c["label"],
                period=c["period"],
                period_start=datetime.fromisoformat(c["period_start"]),
                budget_usd=None if c["budget_usd"] is None else Decimal(c["budget_usd"]),
            )
            for c in held["counters"]
        )
        hold = Hold(
            call_id=held["call_id"],
            counters=counters,
            amount=Decimal(held["amount"]),
            held=held["held"],
            lease=held.get("lease"),
        )
    window = int(data.get("retry_window_seconds") or 0)
    return UsageRecord(**fields, usage=usage, hold=hold, retry_window_seconds=window)


def write_atomically(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to `path` whole or not at all (temporary file, fsync, rename); raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            for line in lines:
                file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line with a single `write()`; a short write (full disk) raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8", "surrogatepass")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
    finally:
        os.close(fd)


@dataclass(slots=True)
class Replayed:
    """What a replay did: records written to the ledger, lines set aside (refused or unreadable), and the soft
    limits the records written crossed (their alerts are the caller's to send)."""

    written: int = 0
    set_aside: int = 0
    crossed: list[SoftLimitCrossed] = field(default_factory=list)

    def __add__(self, other: Replayed) -> Replayed:
        return Replayed(self.written + other.written, self.set_aside + other.set_aside, self.crossed + other.crossed)


def set_aside(directory: Path, name: str, data: dict[str, Any], reason: str) -> None:
    """Keep a record (or an unreadable line) the ledger cannot take, with why, in `refused-<name>.jsonl`."""
    append_line(directory / f"refused-{name}.jsonl", encode({**data, "error": reason[:500]}))


def replay_records(
    engine: Engine,
    records: list[UsageRecord],
    *,
    directory: Path,
    name: str,
    soft_fraction: Decimal = DEFAULT_SOFT_FRACTION,
) -> Replayed:
    """Write records to the ledger, in one transaction if it takes them all, else one by one, setting aside the
    ones it refuses as data. A connection failure raises: nothing is lost, the caller keeps its file."""
    result = Replayed()
    if not records:
        return result
    try:
        result.crossed += insert_records(engine, records, soft_fraction=soft_fraction).crossed
        result.written = len(records)
        return result
    except Exception as exc:
        if not is_refused(exc):
            raise
    for record in records:
        try:
            result.crossed += insert_records(engine, [record], soft_fraction=soft_fraction).crossed
            result.written += 1
        except Exception as exc:
            if not is_refused(exc):
                raise
            set_aside(directory, name, record_to_json(record), str(exc))
            result.set_aside += 1
    return result


def read_records(path: Path, *, directory: Path, name: str) -> tuple[list[UsageRecord], int]:
    """The records of a JSONL file; lines that are not records are set aside. Returns them and how many were."""
    records, bad = [], 0
    for line in path.read_bytes().decode("utf-8", "surrogateescape").splitlines():
        if not line.strip():
            continue
        try:
            records.append(record_from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            set_aside(directory, name, {"line": line[:100_000]}, f"unreadable line in {path.name}: {exc}")
            bad += 1
    return records, bad


def replay_spilled(
    engine: Engine, directory: Path, *, name: str, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> Replayed:
    """Write the records spilled by earlier processes, then delete their files."""
    total = Replayed()
    for path in sorted(directory.glob("unwritten-*.jsonl")) if directory.is_dir() else ():
        records, bad = read_records(path, directory=directory, name=name)
        done = replay_records(engine, records, directory=directory, name=name, soft_fraction=soft_fraction)
        total += Replayed(done.written, done.set_aside + bad, done.crossed)
        path.unlink()
        logger.warning(
            "replayed %d spilled usage records from %s (%d set aside)", done.written, path, done.set_aside + bad
        )
    return total


def replay_refused(
    engine: Engine, directory: Path, *, name: str, soft_fraction: Decimal = DEFAULT_SOFT_FRACTION
) -> Replayed:
    """Try again the records set aside as refused (after the cause was fixed); those refused again stay."""
    total = Replayed()
    for path in sorted(directory.glob("refused-*.jsonl")) if directory.is_dir() else ():
        held = path.with_name(f".{path.name}.replaying")
        os.replace(path, held)
        try:
            records, bad = read_records(held, directory=directory, name=name)
            done = replay_records(engine, records, directory=directory, name=name, soft_fraction=soft_fraction)
        except BaseException:
            os.replace(held, path)
            raise
        total += Replayed(done.written, done.set_aside + bad, done.crossed)
        held.unlink()
    return total
