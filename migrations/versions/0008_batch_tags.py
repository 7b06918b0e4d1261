"""batch tags: a batch's create call's feature and user, carried by its results' records

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("feature", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("user", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("user")
        batch.drop_column("feature")
