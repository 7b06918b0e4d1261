"""spend by day: a covering index for spend per team and day (the dashboard's overview)

Replaces `ix_usage_team_started` (its prefix): a team's records by time use it as before, and summing spend by
team and day reads the index alone instead of every wide row (0.95 s -> 0.46 s for 400,000 records on SQLite).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_team_spend", "usage_records", ["team", "started_at", "repriced_cost_usd", "cost_usd"])
    op.drop_index("ix_usage_team_started", table_name="usage_records")


def downgrade() -> None:
    op.create_index("ix_usage_team_started", "usage_records", ["team", "started_at"])
    op.drop_index("ix_usage_team_spend", table_name="usage_records")
