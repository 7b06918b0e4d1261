"""budget windows: daily, weekly and monthly allowances at once on teams, keys and end users; the budget edge

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None
# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")
WINDOWS = ("daily_budget_usd", "weekly_budget_usd", "monthly_budget_usd")
USER_WINDOWS = ("user_daily_budget_usd", "user_weekly_budget_usd", "user_monthly_budget_usd")


def upgrade() -> None:
    # Every existing budget is its owner's shorthand window (`budget_usd` in `period`): nothing to move.
    with op.batch_alter_table("teams") as teams:
        for name in (*WINDOWS, *USER_WINDOWS):
            teams.add_column(sa.Column(name, MONEY, nullable=True))
        teams.add_column(sa.Column("budget_edge", sa.String(10), nullable=False, server_default="refuse"))
    for table in ("api_keys", "user_budgets"):
        with op.batch_alter_table(table) as windows:
            for name in WINDOWS:
                windows.add_column(sa.Column(name, MONEY, nullable=True))


def downgrade() -> None:
    # The release before knows one window per budget: the others (and clamping at the budget edge) are dropped,
    # and their counters stay in `budget_counters` unused. Plain column drops (SQLite 3.35+): rebuilding `teams`
    # would break the foreign keys of the keys that name it.
    for table in ("user_budgets", "api_keys"):
        with op.batch_alter_table(table, recreate="never") as windows:
            for name in reversed(WINDOWS):
                windows.drop_column(name)
    with op.batch_alter_table("teams", recreate="never") as teams:
        teams.drop_column("budget_edge")
        for name in reversed((*WINDOWS, *USER_WINDOWS)):
            teams.drop_column(name)
