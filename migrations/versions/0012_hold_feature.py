"""a hold keeps its call's feature tag, so a dead process's calls are recorded with it

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("budget_reservations") as holds:
        holds.add_column(sa.Column("feature", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("budget_reservations") as holds:
        holds.drop_column("feature")
