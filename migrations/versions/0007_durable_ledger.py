"""durable ledger: estimated costs, wide client-sent counts, serving processes and the holds they own

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

WIDENED = ("max_tokens_requested", "max_tokens_sent", "retry_count", "web_search_requests", "web_fetch_requests")


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("cost_source", sa.String(length=20), nullable=True))
        for name in WIDENED:
            batch.alter_column(name, type_=sa.BigInteger(), existing_type=sa.Integer())
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("budget_reservations") as batch:
        # Which serving process holds it, and what its record needs if that process dies mid-call.
        batch.add_column(sa.Column("instance_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("started_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("team", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("endpoint", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("model", sa.String(length=200), nullable=True))
        batch.create_index("ix_budget_reservations_instance", ["instance_id"])


def downgrade() -> None:
    with op.batch_alter_table("budget_reservations") as batch:
        batch.drop_index("ix_budget_reservations_instance")
        for name in ("model", "endpoint", "key_id", "team", "started_at", "instance_id"):
            batch.drop_column(name)
    op.drop_table("instances")
    with op.batch_alter_table("usage_records") as batch:
        for name in WIDENED:
            batch.alter_column(name, type_=sa.Integer(), existing_type=sa.BigInteger())
        batch.drop_column("cost_source")
