"""message batches created through the proxy

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("hold_call_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("results_recorded_at", sa.DateTime(), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batches_team", "batches", ["team_id", "created_at"])
    op.create_index("ix_batches_unrecorded", "batches", ["results_recorded_at", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_unrecorded", table_name="batches")
    op.drop_index("ix_batches_team", table_name="batches")
    op.drop_table("batches")
