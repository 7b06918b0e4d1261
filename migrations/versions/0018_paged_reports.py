"""paged reports: indexes that give a report's groups by session or agent in order, a page at a time

Revision ID: 0018
Revises: 0017

On PostgreSQL the groups are ordered by code point with NULL first (`COLLATE "C" NULLS FIRST`), as SQLite's
default order is and as reports sort them, whatever the database's own collation.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None
COLUMNS = ("session", "agent")


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for column in COLUMNS:
        ordered = sa.text(f'{column} COLLATE "C" NULLS FIRST') if postgresql else column
        op.create_index(f"ix_rollup_sessions_{column}", "rollup_sessions", ["grain", ordered, "day"])


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_index(f"ix_rollup_sessions_{column}", table_name="rollup_sessions")
