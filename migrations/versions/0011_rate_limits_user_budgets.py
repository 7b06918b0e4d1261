"""rate limits (requests, input and output tokens per minute) on teams and keys, end-user budgets

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None
# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")
LIMITS = ("rpm", "itpm", "otpm")


def upgrade() -> None:
    with op.batch_alter_table("teams") as teams:
        teams.add_column(sa.Column("user_budget_usd", MONEY, nullable=True))
        for name in LIMITS:
            teams.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table("api_keys") as keys:
        for name in LIMITS:
            keys.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table("budget_reservations") as holds:
        # Whose call a hold is, so a dead process's calls are recorded under their end user.
        holds.add_column(sa.Column("user", sa.String(256), nullable=True))
    op.create_table(
        "user_budgets",
        sa.Column("team_id", sa.Integer(), sa.ForeignKey("teams.id"), nullable=False),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("budget_usd", MONEY, nullable=True),
        sa.PrimaryKeyConstraint("team_id", "user"),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("level", MONEY, nullable=False),
        sa.Column("capacity", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )
    op.create_table(
        "rate_leases",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("instance_id", sa.String(40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "instance_id"),
    )
    op.create_index("ix_rate_leases_instance", "rate_leases", ["instance_id"])


def downgrade() -> None:
    op.drop_index("ix_rate_leases_instance", table_name="rate_leases")
    op.drop_table("rate_leases")
    op.drop_table("rate_buckets")
    op.drop_table("user_budgets")
    with op.batch_alter_table("budget_reservations") as holds:
        holds.drop_column("user")
    with op.batch_alter_table("api_keys") as keys:
        for name in LIMITS:
            keys.drop_column(name)
    with op.batch_alter_table("teams") as teams:
        for name in reversed(LIMITS):
            teams.drop_column(name)
        teams.drop_column("user_budget_usd")
