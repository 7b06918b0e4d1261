"""reconciled days: the scheduled reconciliation's results, one row per UTC day

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None
# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reconciled_days",
        sa.Column("day", sa.DateTime(), nullable=False),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("checked_at", sa.DateTime(), nullable=True),
        sa.Column("drifted", sa.Boolean(), nullable=True),
        sa.Column("ledger_cost_usd", MONEY, nullable=True),
        sa.Column("anthropic_cost_usd", MONEY, nullable=True),
        sa.Column("differences", sa.Integer(), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("day"),
    )


def downgrade() -> None:
    op.drop_table("reconciled_days")
