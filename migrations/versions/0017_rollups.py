"""rollups: usage totals by day and group, kept by the writer, so reports never scan every record

Revision ID: 0017
Revises: 0016

The tables are filled from the records here, with the SQL of this revision (later releases may change
`proxy.ledger.rollups`; a migration must not).
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None
# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")
COUNTS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_creation_5m_input_tokens",
    "cache_creation_1h_input_tokens",
    "cache_read_input_tokens",
    "web_search_requests",
)


def _rollup(name: str, *extra: sa.Column[str]) -> None:
    op.create_table(
        name,
        sa.Column("day", sa.DateTime(), primary_key=True),
        sa.Column("grain", sa.String(5), primary_key=True),
        sa.Column("group_key", sa.String(32), primary_key=True),
        sa.Column("team", sa.String(200)),
        sa.Column("key_id", sa.String(40)),
        sa.Column("feature", sa.String(200)),
        sa.Column("model", sa.String(200)),
        sa.Column("priced_model", sa.String(200)),
        sa.Column("price_source", sa.String(20), nullable=False),
        *extra,
        *(sa.Column(count, sa.BigInteger(), nullable=False) for count in COUNTS),
        sa.Column("cost_usd", MONEY),
        sa.Column("retries", sa.BigInteger(), nullable=False),
        sa.Column("retry_cost_usd", MONEY),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("family_priced_calls", sa.BigInteger(), nullable=False),
        sa.Column("batch_cost_usd", MONEY),
        sa.Column("batch_web_search_requests", sa.BigInteger(), nullable=False),
        sa.Column("interrupted_calls", sa.BigInteger(), nullable=False),
        sa.Column("first_started_at", sa.DateTime(), nullable=False),
        sa.Column("last_started_at", sa.DateTime(), nullable=False),
        # Rows are found by their key alone: SQLite keeps them in the key's own b-tree, not a second one.
        sqlite_with_rowid=False,
    )


COST = "COALESCE(repriced_cost_usd, cost_usd)"
BATCH = "service_tier = 'batch'"
# Each total as the records sum it, in the tables' column order; `None`: a money total.
TOTALS = (
    ("calls", "1"),
    *((count, count) for count in COUNTS[1:]),
    ("cost_usd", None),
    ("retries", "CASE WHEN is_retry THEN 1 ELSE 0 END"),
    ("retry_cost_usd", None),
    ("unpriced_calls", "CASE WHEN price_source = 'unpriced' THEN 1 ELSE 0 END"),
    ("family_priced_calls", "CASE WHEN price_source = 'family' THEN 1 ELSE 0 END"),
    ("batch_cost_usd", None),
    ("batch_web_search_requests", f"CASE WHEN {BATCH} THEN web_search_requests ELSE 0 END"),
    ("interrupted_calls", "CASE WHEN outcome = 'interrupted' THEN 1 ELSE 0 END"),
)
MONEY_OF = {"cost_usd": COST, "retry_cost_usd": f"CASE WHEN is_retry THEN {COST} END"}
MONEY_OF["batch_cost_usd"] = f"CASE WHEN {BATCH} THEN {COST} END"
DIMENSIONS = {
    "team": "team",
    "key_id": "key_id",
    "feature": "feature",
    "model": "model",
    "priced_model": "COALESCE(response_model, model)",
    "price_source": "price_source",
    "user": '"user"',
    "session": "session",
    "agent": "agent",
}


def _fill(table: str, dimensions: tuple[str, ...]) -> None:
    """The table's rows from the existing records: one per UTC day and group, and (but sessions) one per month and
    group."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    _fill_grain(table, dimensions, "day", "date(started_at)" if sqlite else "to_char(started_at, 'YYYY-MM-DD')")
    if table != "rollup_sessions":
        month = "strftime('%Y-%m-01', started_at)" if sqlite else "to_char(started_at, 'YYYY-MM-01')"
        _fill_grain(table, dimensions, "month", month)


def _fill_grain(table: str, dimensions: tuple[str, ...], grain: str, day: str) -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    money = "decimal_sum" if sqlite else "sum"
    sums = [f"{money}({MONEY_OF[name]})" if sql is None else f"sum({sql})" for name, sql in TOTALS]
    groups = [DIMENSIONS[name] for name in dimensions]
    query = (
        f"SELECT {day}, {', '.join(groups)}, {', '.join(sums)}, min(started_at), max(started_at) "  # noqa: S608
        f"FROM usage_records GROUP BY {day}, {', '.join(groups)}"
    )
    target = sa.table(
        table,
        sa.column("grain"),
        sa.column("day"),
        sa.column("group_key"),
        *(sa.column(name) for name in dimensions),
        *(sa.column(name) for name, _ in TOTALS),
        sa.column("first_started_at"),
        sa.column("last_started_at"),
    )
    rows = []
    for found in connection.exec_driver_sql(query):
        when, values, totals = found[0], list(found[1 : 1 + len(dimensions)]), found[1 + len(dimensions) :]
        # The key `proxy.ledger.rollups.group_key` gives the same values.
        key = hashlib.blake2b(repr(tuple(values)).encode(), digest_size=16).hexdigest()
        row = {"grain": grain, "day": f"{when} 00:00:00.000000" if sqlite else f"{when} 00:00:00", "group_key": key}
        row.update(zip(dimensions, values, strict=True))
        row.update(zip([name for name, _ in TOTALS] + ["first_started_at", "last_started_at"], totals, strict=True))
        rows.append(row)
    if rows:
        op.bulk_insert(target, rows)


def upgrade() -> None:
    _rollup("rollup_teams")
    op.create_index("ix_rollup_teams_team", "rollup_teams", ["team", "grain", "day"])
    op.create_index("ix_rollup_teams_key", "rollup_teams", ["key_id", "grain", "day"])
    op.create_index("ix_rollup_teams_grain", "rollup_teams", ["grain", "day"])
    _rollup("rollup_users", sa.Column("user", sa.String(256)))
    op.create_index("ix_rollup_users_team", "rollup_users", ["team", "grain", "day"])
    op.create_index("ix_rollup_users_user", "rollup_users", ["user", "grain", "day"])
    _rollup(
        "rollup_sessions",
        sa.Column("user", sa.String(256)),
        sa.Column("session", sa.String(200)),
        sa.Column("agent", sa.String(200)),
    )
    op.create_index("ix_rollup_sessions_team", "rollup_sessions", ["team", "grain", "day"])
    base = ("team", "key_id", "feature", "model", "priced_model", "price_source")
    _fill("rollup_teams", base)
    _fill("rollup_users", (*base, "user"))
    _fill("rollup_sessions", (*base, "user", "session", "agent"))


def downgrade() -> None:
    # The release before reads the records themselves: the rollups are only dropped.
    for name in ("rollup_sessions", "rollup_users", "rollup_teams"):
        op.drop_table(name)
