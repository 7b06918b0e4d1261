"""people: personal keys (owner, expiry, refresh), people and their groups, groups as teams, browser sessions,
OIDC sign-ins under way, device authorizations

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as keys:
        keys.add_column(sa.Column("owner", sa.String(300), nullable=True))
        keys.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        keys.add_column(sa.Column("refresh_hash", sa.String(64), nullable=True))
        keys.create_index("ix_api_keys_owner", ["owner"])
        keys.create_unique_constraint("uq_api_keys_refresh_hash", ["refresh_hash"])
    op.create_table(
        "people",
        sa.Column("subject", sa.String(300), primary_key=True),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "group_teams",
        sa.Column("group", sa.String(256), primary_key=True),
        sa.Column("team_id", sa.Integer(), sa.ForeignKey("teams.id"), primary_key=True),
    )
    op.create_index("ix_group_teams_team_id", "group_teams", ["team_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("token_proof", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])
    op.create_table(
        "sign_in_states",
        sa.Column("state_hash", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("verifier", sa.String(128), nullable=False),
        sa.Column("return_to", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_sign_in_states_created_at", "sign_in_states", ["created_at"])
    op.create_table(
        "device_grants",
        sa.Column("device_hash", sa.String(64), primary_key=True),
        sa.Column("user_code", sa.String(16), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("polled_at", sa.DateTime(), nullable=True),
        sa.Column("client_address", sa.String(64), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("subject", sa.String(300), nullable=True),
        sa.Column("team_id", sa.Integer(), sa.ForeignKey("teams.id"), nullable=True),
        sa.Column("key_name", sa.String(200), nullable=True),
        sa.Column("key_days", sa.Integer(), nullable=True),
    )
    op.create_index("ix_device_grants_expires_at", "device_grants", ["expires_at"])


def downgrade() -> None:
    # The release before cannot read an expiry: a key that has one is revoked rather than left to work forever.
    revoke = "UPDATE api_keys SET revoked_at = :now WHERE expires_at IS NOT NULL AND revoked_at IS NULL"
    op.execute(sa.text(revoke).bindparams(now=datetime.now(UTC).replace(tzinfo=None)))
    for table in ("device_grants", "sign_in_states", "web_sessions", "group_teams", "people"):
        op.drop_table(table)
    with op.batch_alter_table("api_keys") as keys:
        keys.drop_constraint("uq_api_keys_refresh_hash", type_="unique")
        keys.drop_index("ix_api_keys_owner")
        keys.drop_column("refresh_hash")
        keys.drop_column("expires_at")
        keys.drop_column("owner")
