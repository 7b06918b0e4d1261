"""budget_reservations is budget_holds: it keeps holds, a call's own and a process's leases (one word for each)

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

INDEXES = (("expires_at", "expires_at"), ("instance", "instance_id"))  # name suffix, column


def upgrade() -> None:
    op.rename_table("budget_reservations", "budget_holds")
    for suffix, column in INDEXES:
        _rename_index("budget_holds", f"ix_budget_reservations_{suffix}", f"ix_budget_holds_{suffix}", column)


def downgrade() -> None:
    for suffix, column in INDEXES:
        _rename_index("budget_holds", f"ix_budget_holds_{suffix}", f"ix_budget_reservations_{suffix}", column)
    op.rename_table("budget_holds", "budget_reservations")


def _rename_index(table: str, old: str, new: str, column: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER INDEX {old} RENAME TO {new}")
        return
    # SQLite cannot rename an index: the same index again, under its new name.
    op.drop_index(old, table_name=table)
    op.create_index(new, table, [column])
