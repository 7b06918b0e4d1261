"""The ledger's side of Message Batches: which team created which batch, and who reads their results.

A batch created through spendgate belongs to its creator's team (`batches` table); its budget hold is released
by the record of its last result, or by `abandon` when the batch vanished upstream with its results unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update

from proxy.ledger.budgets import settle
from proxy.ledger.db import write_transaction
from proxy.ledger.keys import KeyInfo
from proxy.ledger.schema import Batch


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOwner:
    """What the proxy knows of a batch it created."""

    id: str
    team_id: int
    key_id: str
    hold_call_id: str
    created_at: datetime
    results_recorded: bool
    # The create call's tags, carried by every result's record.
    feature: str | None = None
    user: str | None = None
    session: str | None = None
    agent: str | None = None
    parent_agent: str | None = None


def save_batch(
    engine: Engine,
    *,
    batch_id: str,
    key: KeyInfo,
    hold_call_id: str,
    created_at: datetime,
    feature: str | None,
    user: str | None,
    session: str | None,
    agent: str | None,
    parent_agent: str | None,
) -> None:
    """Remember that this team created this batch, and the create call's tags (blocking)."""
    with engine.begin() as connection:
        connection.execute(
            insert(Batch).values(
                id=batch_id,
                team_id=key.team_id,
                key_id=key.key_id,
                hold_call_id=hold_call_id,
                created_at=created_at,
                feature=feature,
                user=user,
                session=session,
                agent=agent,
                parent_agent=parent_agent,
            )
        )


def find_batch(engine: Engine, batch_id: str) -> BatchOwner | None:
    """The proxy's record of a batch, or None (blocking)."""
    with engine.connect() as connection:
        row = connection.execute(select(*Batch.__table__.columns).where(Batch.id == batch_id)).first()
    return None if row is None else _owner(row)


def owned_ids(engine: Engine, team_id: int, ids: list[str]) -> set[str]:
    """Which of these batch ids the team created through the proxy (blocking)."""
    if not ids:
        return set()
    with engine.connect() as connection:
        return set(connection.execute(select(Batch.id).where(Batch.team_id == team_id, Batch.id.in_(ids))).scalars())


def claim_unrecorded(engine: Engine, *, now: datetime, lease: timedelta, limit: int = 20) -> list[BatchOwner]:
    """Batches whose results nobody has recorded, each leased to this caller so replicas share the work."""
    claimed = []
    with engine.connect() as connection:
        rows = connection.execute(
            select(*Batch.__table__.columns)
            .where(Batch.results_recorded_at.is_(None), or_(Batch.lease_until.is_(None), Batch.lease_until < now))
            .order_by(Batch.created_at)
            .limit(limit)
        ).all()
        for row in rows:
            won = connection.execute(
                update(Batch)
                .where(Batch.id == row.id, or_(Batch.lease_until.is_(None), Batch.lease_until < now))
                .values(lease_until=now + lease)
            )
            connection.commit()
            if won.rowcount == 1:
                claimed.append(_owner(row))
    return claimed


def release_lease(engine: Engine, batch_id: str) -> None:
    """Give up a reconciler's claim on a batch (blocking)."""
    with engine.begin() as connection:
        connection.execute(update(Batch).where(Batch.id == batch_id).values(lease_until=None))


def _owner(row: Any) -> BatchOwner:
    return BatchOwner(
        id=row.id,
        team_id=row.team_id,
        key_id=row.key_id,
        hold_call_id=row.hold_call_id,
        created_at=row.created_at,
        results_recorded=row.results_recorded_at is not None,
        feature=row.feature,
        user=row.user,
        session=row.session,
        agent=row.agent,
        parent_agent=row.parent_agent,
    )


def abandon(engine: Engine, batch: BatchOwner) -> None:
    """Release a vanished batch's hold and stop looking for its results (blocking)."""
    with write_transaction(engine) as connection:
        settle(connection, [], soft_fraction=Decimal(1), release=[batch.hold_call_id])
        connection.execute(update(Batch).where(Batch.id == batch.id).values(results_recorded_at=datetime.now(UTC)))
