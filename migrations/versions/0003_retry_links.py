"""retry links: request fingerprints, attempt numbers, per-team retry window

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_usage_key_fingerprint", ["key_id", "fingerprint", "started_at"])
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("retry_window_seconds", sa.Integer(), nullable=False, server_default="600"))


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("retry_window_seconds")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_index("ix_usage_key_fingerprint")
        batch.drop_column("attempt")
        batch.drop_column("fingerprint")
