"""budget counters and reservations

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")


def upgrade() -> None:
    op.create_table(
        "budget_counters",
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("spent_usd", MONEY, nullable=False),
        sa.Column("reserved_usd", MONEY, nullable=False),
        sa.Column("soft_alerted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "period_start"),
    )
    op.create_table(
        "budget_reservations",
        sa.Column("call_id", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("amount_usd", MONEY, nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("call_id", "scope"),
    )
    op.create_index("ix_budget_reservations_expires_at", "budget_reservations", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_budget_reservations_expires_at", table_name="budget_reservations")
    op.drop_table("budget_reservations")
    op.drop_table("budget_counters")
