"""The audit chain's two ends: its head, whose lock orders every write to the chain, and where `spendgate prune`
cut it (the position and hash the records after it continue from, and the day before which the records are gone;
their totals stay in the rollups)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from proxy.ledger.schema import AdminEvent, AuditHead

PRUNE_ACTION = "prune"


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The latest cut: records at chain positions up to `pos` are pruned, and `before` is the first UTC midnight
    from which every record is still in the ledger."""

    pos: int
    hash: str
    before: datetime
    event_pos: int


class PrunedRange(ValueError):
    """A read that needs records a prune deleted."""


def require_records(connection: Connection, since: datetime, instead: str) -> None:
    """Raise `PrunedRange` (saying what to do `instead`) when records from `since` on may have been pruned."""
    cut = latest(connection)
    if cut is not None and since < cut.before:
        raise PrunedRange(f"the records before {cut.before.date().isoformat()} were pruned: {instead}")


def lock_head(connection: Connection) -> tuple[int, str]:
    """Lock the end of the chain for this transaction; returns its position and hash."""
    pos, head = connection.execute(
        select(AuditHead.pos, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
    ).one()
    return pos, head


def latest(connection: Connection) -> Checkpoint | None:
    """The latest prune's checkpoint, from its audit event (chained like any other, so it cannot be edited or
    dropped unnoticed), or None when the ledger was never pruned. Only an event inside the chain counts: one past
    the head was never chained, and nothing vouches for it."""
    head = select(AuditHead.pos).where(AuditHead.id == 1).scalar_subquery()
    found = connection.execute(
        select(AdminEvent.chain_pos, AdminEvent.details)
        .where(AdminEvent.action == PRUNE_ACTION, AdminEvent.chain_pos <= head)
        .order_by(AdminEvent.chain_pos.desc())
        .limit(1)
    ).first()
    if found is None:
        return None
    after = json.loads(found.details)["after"]
    if not after["cut_pos"] < found.chain_pos:
        # A genuine prune's event is written after the records it cut; one before its own cut would hide the
        # chain between them from verification.
        raise ValueError(f"the prune checkpoint at entry {found.chain_pos} claims a cut after itself: forged")
    return Checkpoint(
        pos=after["cut_pos"],
        hash=after["cut_hash"],
        before=datetime.fromisoformat(after["before"]),
        event_pos=found.chain_pos,
    )
