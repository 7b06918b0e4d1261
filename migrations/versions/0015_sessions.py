"""sessions: a call's agent session, agent and parent agent (Claude Code's ids, or x-spendgate-session) on its
record, on its budget hold (so a dead process's calls keep them) and on the batch it created (so its results do)

The index finds one session's records in order (`GET /admin/usage?session=…`, with a team or not: a session's
records are few) without reading every record; a team's sessions over a period (the dashboard's top sessions) are
read through the team's index by time, `ix_usage_team_spend`.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

COLUMNS = ("session", "agent", "parent_agent")
TABLES = ("usage_records", "budget_holds", "batches")
INDEX = "ix_usage_session"


def upgrade() -> None:
    # Nullable columns added in place (no table rebuild on SQLite, no rewrite on PostgreSQL): records written
    # before have none. On PostgreSQL the `budget_reservations` view (0013) lists budget_holds' columns as they
    # were, so it is untouched, and replicas of the release before keep writing holds through it.
    for table in TABLES:
        for name in COLUMNS:
            op.add_column(table, sa.Column(name, sa.String(200), nullable=True))
    op.create_index(INDEX, "usage_records", ["session", "started_at"])


def downgrade() -> None:
    # The sessions recorded are lost. The audit hash of a record that had one covers it (proxy/ledger/audit.py):
    # the release before, which cannot read it back, would report such a record as edited.
    op.drop_index(INDEX, table_name="usage_records")
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as altered:
            for name in reversed(COLUMNS):
                altered.drop_column(name)
