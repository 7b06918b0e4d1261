"""repricing: corrected costs beside the original ones

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("repriced_cost_usd", MONEY, nullable=True))
        batch.add_column(sa.Column("repriced_price_version", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("repriced_by", sa.BigInteger(), nullable=True))
        batch.create_index("ix_usage_records_repriced_by", ["repriced_by"])
    op.create_table(
        "reprice_entries",
        sa.Column("event_pos", sa.BigInteger(), nullable=False),
        sa.Column("record_id", sa.String(length=40), nullable=False),
        sa.Column("cost_usd", MONEY, nullable=False),
        sa.Column("price_version", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("event_pos", "record_id"),
    )


def downgrade() -> None:
    op.drop_table("reprice_entries")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_index("ix_usage_records_repriced_by")
        batch.drop_column("repriced_by")
        batch.drop_column("repriced_price_version")
        batch.drop_column("repriced_cost_usd")
