"""ledger: teams, keys, usage records

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Exact decimal money: NUMERIC on PostgreSQL, the decimal's text on SQLite (see proxy.ledger.schema.Money).
MONEY = sa.Numeric().with_variant(sa.String(64), "sqlite")


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("budget_usd", MONEY, nullable=True),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("max_output_tokens", sa.Integer(), nullable=True),
        sa.Column("cap_policy", sa.String(length=10), nullable=False),
        sa.Column("models", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "usage_records",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=False),
        sa.Column("team", sa.String(length=200), nullable=True),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("feature", sa.String(length=200), nullable=True),
        sa.Column("user", sa.String(length=256), nullable=True),
        sa.Column("endpoint", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("response_model", sa.String(length=200), nullable=True),
        sa.Column("upstream_request_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=30), nullable=False),
        sa.Column("error_type", sa.String(length=100), nullable=True),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("batch_id", sa.String(length=100), nullable=True),
        sa.Column("custom_id", sa.String(length=100), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_creation_5m_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_creation_1h_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("web_search_requests", sa.Integer(), nullable=False),
        sa.Column("web_fetch_requests", sa.Integer(), nullable=False),
        sa.Column("service_tier", sa.String(length=30), nullable=True),
        sa.Column("speed", sa.String(length=30), nullable=True),
        sa.Column("inference_geo", sa.String(length=30), nullable=True),
        sa.Column("cost_usd", MONEY, nullable=True),
        sa.Column("price_version", sa.String(length=40), nullable=False),
        sa.Column("price_source", sa.String(length=20), nullable=False),
        sa.Column("is_retry", sa.Boolean(), nullable=False),
        sa.Column("retry_reason", sa.String(length=20), nullable=True),
        sa.Column("retry_of", sa.String(length=40), nullable=True),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("max_tokens_requested", sa.Integer(), nullable=True),
        sa.Column("max_tokens_sent", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttfb_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index("ix_usage_key_started", ["key_id", "started_at"], unique=False)
        batch_op.create_index("ix_usage_started", ["started_at"], unique=False)
        batch_op.create_index("ix_usage_team_started", ["team", "started_at"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=20), nullable=False),
        sa.Column("budget_usd", MONEY, nullable=True),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["team_id"],
            ["teams.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_team_id"), ["team_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_team_id"))

    op.drop_table("api_keys")
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_team_started")
        batch_op.drop_index("ix_usage_started")
        batch_op.drop_index("ix_usage_key_started")

    op.drop_table("usage_records")
    op.drop_table("teams")
