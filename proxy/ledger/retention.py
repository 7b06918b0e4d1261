"""Retention: `spendgate prune` exports the oldest usage records to a file, then deletes them from the ledger.

What goes is a prefix of the audit chain (every record at or before the cut position started before the horizon;
a record chained later, however old, stays until a later prune), so the chain still verifies from the cut: its
position and hash are written as an audit event (`proxy/ledger/checkpoints.py`) with the export's SHA-256, before
anything is deleted. The rollups keep every pruned day's totals, so reports, budgets and the dashboard are
unchanged. Deleting goes in short transactions: writers wait for one chunk, never for the whole prune. A prune
that dies part way is finished by the next one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, cast

from sqlalchemy import Engine, delete, func, select

from proxy.ledger import checkpoints, partitions
from proxy.ledger.audit import REPRICE_ACTION, record_event
from proxy.ledger.checkpoints import lock_head
from proxy.ledger.db import write_transaction
from proxy.ledger.export import PUBLIC_FIELDS, public_record, write_csv, write_jsonl
from proxy.ledger.schema import AdminEvent, AuditHead, UsageRow
from proxy.ledger.windows import calendar_start

Format = Literal["jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv")
# Records deleted per transaction: long enough to be efficient, short enough that a writer barely waits.
DELETE_CHUNK = 20_000
STREAM_BATCH = 2_000
# Besides the spec's record fields, what ties each exported record to the chain it left.
CHAIN_FIELDS = ("chain_pos", "content_hash", "chain_hash")
PARTIAL = ".partial"


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned:
    """What a prune did."""

    records: int  # exported and deleted by this run (not counting the rest of an earlier run it finished)
    cut_pos: int  # the chain position the ledger now starts after
    cut_hash: str
    event_pos: int | None  # the prune's audit event; None when nothing was old enough
    export_sha256: str | None
    kept_older: int  # records started before the horizon but chained after a newer one: kept for a later prune


class PruneRefused(ValueError):
    """The prune cannot go ahead as asked (a horizon not at midnight, in the future, before the last one; an
    export file that exists)."""


def horizon_of(text_date: datetime) -> datetime:
    """A prune horizon: a UTC midnight no later than today's."""
    horizon = text_date.astimezone(UTC)
    if horizon != calendar_start("day", horizon):
        raise PruneRefused(f"--before must be a date (a UTC midnight), not {text_date.isoformat()}")
    if horizon > datetime.now(UTC):
        raise PruneRefused(f"--before {horizon.date().isoformat()} is in the future: today's records cannot be pruned")
    return horizon


def prune(
    engine: Engine,
    *,
    before: datetime,
    export: Path,
    fmt: Format,
    actor: str,
    progress: Callable[[int, int | None], None] | None = None,
) -> Pruned:
    """Export the records of the chain prefix that started before `before` (a UTC midnight) to `export` (gzipped
    when it ends in `.gz`), write the checkpoint, then delete them."""
    before = horizon_of(before)
    if export.exists():
        raise PruneRefused(f"{export} exists: an earlier export is never overwritten, choose a new file")
    with engine.connect() as connection:
        cut = checkpoints.latest(connection)
        head_pos = connection.execute(select(AuditHead.pos).where(AuditHead.id == 1)).scalar_one()
    if cut is not None and before < cut.before:
        raise PruneRefused(f"the ledger was already pruned up to {cut.before.date().isoformat()}")
    start = 0 if cut is None else cut.pos
    # An earlier prune that died after its checkpoint left some of its records: they are in its export.
    if cut is not None:
        _delete_through(engine, cut.pos, cut.before)
    partial = export.with_name(export.name + PARTIAL)
    count, last, digest = _export(engine, start, head_pos, before, partial, fmt, progress)
    if count == 0:
        partial.unlink()
        return Pruned(
            records=0,
            cut_pos=start,
            cut_hash=cut.hash if cut else "",
            event_pos=None,
            export_sha256=None,
            kept_older=_kept_older(engine, before),
        )
    os.replace(partial, export)
    _sync_folder(export.parent)
    cut_pos, cut_hash = last
    try:
        event_pos = _checkpoint(engine, start, head_pos, before, (cut_pos, cut_hash), count, export, fmt, digest, actor)
    except PruneRefused:
        export.unlink()
        raise
    _delete_through(engine, cut_pos, before)
    return Pruned(
        records=count,
        cut_pos=cut_pos,
        cut_hash=cut_hash,
        event_pos=event_pos,
        export_sha256=digest,
        kept_older=_kept_older(engine, before),
    )


def _checkpoint(
    engine: Engine,
    start: int,
    head_pos: int,
    before: datetime,
    cut: tuple[int, str],
    count: int,
    export: Path,
    fmt: Format,
    digest: str,
    actor: str,
) -> int:
    """Write the cut as an audit event, under the chain's lock, unless the export went stale while it was written:
    another prune moved the cut, or a reprice corrected costs the export holds as they were."""
    with write_transaction(engine) as connection:
        lock_head(connection)
        now = checkpoints.latest(connection)
        if (0 if now is None else now.pos) != start:
            raise PruneRefused("another prune cut the ledger meanwhile: run this one again")
        repriced = select(AdminEvent.chain_pos).where(
            AdminEvent.action == REPRICE_ACTION, AdminEvent.chain_pos > head_pos
        )
        if connection.execute(repriced.limit(1)).first() is not None:
            raise PruneRefused("a reprice corrected costs while the records were exported: run the prune again")
        return record_event(
            connection,
            actor=actor,
            action=checkpoints.PRUNE_ACTION,
            target="usage_records",
            before={},
            after={
                "before": before.isoformat(),
                "cut_pos": cut[0],
                "cut_hash": cut[1],
                "records": count,
                "export": {"path": str(export), "format": fmt, "sha256": digest},
            },
        )


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable before the checkpoint that names its file is written."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _export(
    engine: Engine,
    start: int,
    head_pos: int,
    before: datetime,
    path: Path,
    fmt: Format,
    progress: Callable[[int, int | None], None] | None,
) -> tuple[int, tuple[int, str], str]:
    """Write the records chained after `start` up to the first one that started at or after `before` (or the head),
    in chain order; returns how many, the last one's (position, chain hash) and the file's SHA-256 (fsynced)."""
    query = (
        select(*UsageRow.__table__.columns)
        .where(UsageRow.chain_pos > start, UsageRow.chain_pos <= head_pos)
        .order_by(UsageRow.chain_pos)
    )
    count, last = 0, (start, "")

    def exported(rows: Any) -> Iterator[dict[str, Any]]:
        nonlocal count, last
        for row in rows:
            if row.started_at >= before:
                return
            record = public_record(row)
            record.update({name: getattr(row, name) for name in CHAIN_FIELDS})
            count, last = count + 1, (row.chain_pos, row.chain_hash)
            if progress is not None and count % STREAM_BATCH == 0:
                progress(count, None)
            yield record

    # A `.partial` left by a prune that died while exporting is ours to overwrite.
    with path.open("wb") as raw:
        hashed = _Hashing(raw)
        buffered = io.BufferedWriter(hashed)
        compressed = path.name.removesuffix(PARTIAL).endswith(".gz")
        sink = cast(IO[bytes], gzip.GzipFile(fileobj=buffered, mode="wb") if compressed else buffered)
        with io.TextIOWrapper(sink, encoding="utf-8", newline="") as text, engine.connect() as connection:
            rows = connection.execution_options(yield_per=STREAM_BATCH).execute(query)
            if fmt == "jsonl":
                write_jsonl(exported(rows), text)
            else:
                write_csv(exported(rows), text, fields=(*PUBLIC_FIELDS, *CHAIN_FIELDS))
            rows.close()
        # Closing the gzip stream writes its trailer but leaves the file it wrote to open.
        if not buffered.closed:
            buffered.flush()
        raw.flush()
        os.fsync(raw.fileno())
    return count, last, hashed.digest.hexdigest()


class _Hashing(io.RawIOBase):
    """A binary file that hashes what is written through it (closing it leaves the file open)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self._raw.write(view)
        return len(view)


def _delete_through(engine: Engine, cut_pos: int, before: datetime) -> None:
    """Delete the records chained at or before `cut_pos` (a cut of the horizon `before`): on PostgreSQL whole
    months at once (`partitions.drop_pruned`), then the rest a chunk per transaction. Each chunk is found before
    its transaction (nothing is chained below a cut any more): with nothing to delete, writers never wait."""
    partitions.drop_pruned(engine, cut_pos, before)
    chunk = select(UsageRow.chain_pos).where(UsageRow.chain_pos <= cut_pos).order_by(UsageRow.chain_pos)
    while True:
        with engine.connect() as connection:
            last = connection.execute(select(func.max(chunk.limit(DELETE_CHUNK).subquery().c.chain_pos))).scalar()
        if last is None:
            return
        with write_transaction(engine) as connection:
            connection.execute(delete(UsageRow).where(UsageRow.chain_pos <= last))


def _kept_older(engine: Engine, before: datetime) -> int:
    with engine.connect() as connection:
        return connection.execute(
            select(func.count()).select_from(UsageRow).where(UsageRow.started_at < before)
        ).scalar_one()
