"""budget_reservations is budget_holds: it keeps holds, a call's own and a process's leases (one word for each)

Replicas of the previous release may still be serving while the first new one migrates (a rolling upgrade): on
PostgreSQL a view keeps the old name working for them (a simple view: PostgreSQL writes through it). A later
migration that changes budget_holds' columns drops the view first. SQLite serves one host, whose processes
restart together: no view.

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
    if _postgres():
        op.execute("ALTER TABLE budget_holds RENAME CONSTRAINT budget_reservations_pkey TO budget_holds_pkey")
        op.execute("CREATE VIEW budget_reservations AS SELECT * FROM budget_holds")


def downgrade() -> None:
    if _postgres():
        op.execute("DROP VIEW budget_reservations")
        op.execute("ALTER TABLE budget_holds RENAME CONSTRAINT budget_holds_pkey TO budget_reservations_pkey")
    for suffix, column in INDEXES:
        _rename_index("budget_holds", f"ix_budget_holds_{suffix}", f"ix_budget_reservations_{suffix}", column)
    op.rename_table("budget_holds", "budget_reservations")


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def _rename_index(table: str, old: str, new: str, column: str) -> None:
    if _postgres():
        op.execute(f"ALTER INDEX {old} RENAME TO {new}")
        return
    # SQLite cannot rename an index: the same index again, under its new name.
    op.drop_index(old, table_name=table)
    op.create_index(new, table, [column])
