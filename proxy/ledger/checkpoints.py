"""Where `spendgate prune` cut the ledger: the audit chain's position and hash the records after it continue from,
and the day before which the records are gone (their totals stay in the rollups)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from proxy.ledger.schema import AdminEvent

PRUNE_ACTION = "prune"


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The latest cut: records at chain positions up to `pos` are pruned, and `before` is the first UTC midnight
    from which every record is still in the ledger."""

    pos: int
    hash: str
    before: datetime
    event_pos: int


def latest(connection: Connection) -> Checkpoint | None:
    """The latest prune's checkpoint, from its audit event (chained like any other, so it cannot be edited or
    dropped unnoticed), or None when the ledger was never pruned."""
    found = connection.execute(
        select(AdminEvent.chain_pos, AdminEvent.details)
        .where(AdminEvent.action == PRUNE_ACTION)
        .order_by(AdminEvent.chain_pos.desc())
        .limit(1)
    ).first()
    if found is None:
        return None
    after = json.loads(found.details)["after"]
    return Checkpoint(
        pos=after["cut_pos"],
        hash=after["cut_hash"],
        before=datetime.fromisoformat(after["before"]),
        event_pos=found.chain_pos,
    )
