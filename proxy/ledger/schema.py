"""The ledger's tables, as SQLAlchemy 2 typed models. Alembic migrations in `migrations/` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from proxy.types import BudgetEdge, CapPolicy, Period


class Money(TypeDecorator[Decimal]):
    """Exact USD amounts: NUMERIC on PostgreSQL; on SQLite, which has no decimal type and would
    round-trip through a float, the decimal's exact text."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(64))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored without zone (SQLite keeps none) and always read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    period: Mapped[Period] = mapped_column(String(10), default="month")
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    cap_policy: Mapped[CapPolicy] = mapped_column(String(10), default="clamp")
    # Comma-separated allow-list; NULL means every model.
    models: Mapped[str | None] = mapped_column(Text)
    # An identical request from the same key within this many seconds is flagged as a repeat; 0 disables.
    retry_window_seconds: Mapped[int] = mapped_column(Integer, default=600, server_default="600")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Each end user's budget per period (overrides in `user_budgets`); NULL: no end-user budgets.
    user_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    # Budget windows besides the shorthand `budget_usd` in `period` (`proxy/ledger/windows.py`): the team's, and
    # each end user's (besides `user_budget_usd`). The column of the shorthand's own period is always NULL.
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    weekly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    user_daily_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    user_weekly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    user_monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    budget_edge: Mapped[BudgetEdge] = mapped_column(String(10), default="refuse", server_default="refuse")
    # Requests, input tokens and output tokens per minute; NULL: no limit.
    rpm: Mapped[int | None] = mapped_column(Integer)
    itpm: Mapped[int | None] = mapped_column(Integer)
    otpm: Mapped[int | None] = mapped_column(Integer)


class APIKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the key; the key itself is shown once at creation and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    period: Mapped[Period] = mapped_column(String(10), default="month")
    # The key's other budget windows (`proxy/ledger/windows.py`).
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    weekly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rpm: Mapped[int | None] = mapped_column(Integer)
    itpm: Mapped[int | None] = mapped_column(Integer)
    otpm: Mapped[int | None] = mapped_column(Integer)
    # The person a personal key belongs to (`oidc:<sub>`): its calls are theirs, whatever the client says.
    owner: Mapped[str | None] = mapped_column(String(300), index=True)
    # After this instant the key is refused like a revoked one; NULL: never.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # SHA-256 of the refresh token `spendgate login` keeps to renew this key without a browser; NULL: none.
    refresh_hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class Person(Base):
    """Someone who signed in with the identity provider, as of their last sign-in."""

    __tablename__ = "people"

    # `oidc:<sub>`: the subject the identity provider vouches for, never an email (emails are reassigned).
    subject: Mapped[str] = mapped_column(String(300), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(200))
    # JSON list of the provider's groups at the last sign-in: what their teams and role are derived from.
    groups: Mapped[str] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GroupTeam(Base):
    """An identity-provider group whose members belong to a team."""

    __tablename__ = "group_teams"

    group: Mapped[str] = mapped_column(String(256), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), primary_key=True, index=True)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random id, this table its hash, so a stolen database opens no
    session and signing out on one replica signs out on all."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    # `oidc:<sub>` for a person, `admin-token` for the break-glass token.
    actor: Mapped[str] = mapped_column(String(300))
    # The token every form and cookie-authenticated admin API change must carry (CSRF).
    csrf: Mapped[str] = mapped_column(String(64))
    # For `admin-token` sessions: an HMAC of the id under the admin token, so rotating the token signs them out.
    token_proof: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class SignInState(Base):
    """An OIDC sign-in under way: what the callback must find (state) and check (nonce, PKCE verifier)."""

    __tablename__ = "sign_in_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64))
    verifier: Mapped[str] = mapped_column(String(128))
    # A path on this dashboard (never another host): where the person goes once signed in.
    return_to: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class DeviceGrant(Base):
    """An RFC 8628 device authorization: a CLI waiting for a person to approve it in a browser."""

    __tablename__ = "device_grants"

    device_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_code: Mapped[str] = mapped_column(String(16), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Where the request came from, shown to the person asked to approve it (RFC 8628 section 5.4).
    client_address: Mapped[str | None] = mapped_column(String(64))
    # pending -> approved | denied; approved -> issued (the key was handed out: the code is spent).
    status: Mapped[str] = mapped_column(String(10))
    subject: Mapped[str | None] = mapped_column(String(300))
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"))
    key_name: Mapped[str | None] = mapped_column(String(200))
    key_days: Mapped[int | None] = mapped_column(Integer)


class UserBudget(Base):
    """One end user's own budget in a team, instead of the team's `user_budget_usd` (NULL: no limit)."""

    __tablename__ = "user_budgets"

    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), primary_key=True)
    user: Mapped[str] = mapped_column(String(256), primary_key=True)
    # In the team's period; their other windows below (`proxy/ledger/windows.py`). A user with a row has these
    # windows instead of the team's per-user ones.
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    weekly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    monthly_budget_usd: Mapped[Decimal | None] = mapped_column(Money)


class UsageRow(Base):
    __tablename__ = "usage_records"

    # A monotonically increasing surrogate keeps inserts append-only and gives exports a stable order.
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    team: Mapped[str | None] = mapped_column(String(200))
    key_id: Mapped[str | None] = mapped_column(String(40))
    feature: Mapped[str | None] = mapped_column(String(200))
    user: Mapped[str | None] = mapped_column(String(256))
    session: Mapped[str | None] = mapped_column(String(200))
    agent: Mapped[str | None] = mapped_column(String(200))
    parent_agent: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    response_model: Mapped[str | None] = mapped_column(String(200))
    upstream_request_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(30))
    error_type: Mapped[str | None] = mapped_column(String(100))
    streamed: Mapped[bool] = mapped_column(Boolean)
    batch_id: Mapped[str | None] = mapped_column(String(100))
    custom_id: Mapped[str | None] = mapped_column(String(100))
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_creation_5m_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_creation_1h_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_input_tokens: Mapped[int] = mapped_column(BigInteger)
    web_search_requests: Mapped[int] = mapped_column(BigInteger)
    web_fetch_requests: Mapped[int] = mapped_column(BigInteger)
    service_tier: Mapped[str | None] = mapped_column(String(30))
    speed: Mapped[str | None] = mapped_column(String(30))
    inference_geo: Mapped[str | None] = mapped_column(String(30))
    cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    price_version: Mapped[str] = mapped_column(String(40))
    price_source: Mapped[str] = mapped_column(String(20))
    cost_source: Mapped[str | None] = mapped_column(String(20))
    is_retry: Mapped[bool] = mapped_column(Boolean)
    retry_reason: Mapped[str | None] = mapped_column(String(20))
    retry_of: Mapped[str | None] = mapped_column(String(40))
    retry_count: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the request's canonical JSON: how attempts of one call find each other.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_tokens_requested: Mapped[int | None] = mapped_column(BigInteger)
    max_tokens_sent: Mapped[int | None] = mapped_column(BigInteger)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttfb_ms: Mapped[float | None] = mapped_column(Float)
    # The audit chain (see proxy/ledger/audit.py): this record's content hash, its place in the chain, the chain's hash.
    content_hash: Mapped[str | None] = mapped_column(String(64))
    chain_pos: Mapped[int | None] = mapped_column(BigInteger)
    chain_hash: Mapped[str | None] = mapped_column(String(64))
    # A correction by `spendgate reprice`: the record's own cost stays as written (and hashed); the corrected
    # one sits beside it, vouched for by the audit event at chain position `repriced_by`.
    repriced_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    repriced_price_version: Mapped[str | None] = mapped_column(String(40))
    repriced_by: Mapped[int | None] = mapped_column(BigInteger, index=True)

    # On PostgreSQL the table is partitioned by month of `started_at` (migration 0019, `partitions.py`): its
    # unique keys must hold that column, so there the primary key is (seq, started_at) and these two include it.
    __table_args__ = (
        UniqueConstraint("id").ddl_if(dialect="sqlite"),
        UniqueConstraint("id", "started_at", name="usage_records_id_key").ddl_if(dialect="postgresql"),
        Index("ix_usage_chain_pos", "chain_pos", unique=True).ddl_if(dialect="sqlite"),
        Index("ix_usage_chain_pos", "chain_pos", "started_at", unique=True).ddl_if(dialect="postgresql"),
        # Covering: spend by team and day is read from the index alone (migration 0009).
        Index("ix_usage_team_spend", "team", "started_at", "repriced_cost_usd", "cost_usd"),
        Index("ix_usage_key_started", "key_id", "started_at"),
        Index("ix_usage_started", "started_at"),
        Index("ix_usage_key_fingerprint", "key_id", "fingerprint", "started_at"),
        # One session's records, in order, whatever its team (migration 0015).
        Index("ix_usage_session", "session", "started_at"),
    )


class _Rollup:
    """Totals of the usage records of one UTC day or month and one group (`proxy/ledger/rollups.py`), kept by the
    writer in the records' own transaction so reports read days (or months) x groups, never every record."""

    day: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    # "day", or "month" (then `day` is the month's first).
    grain: Mapped[str] = mapped_column(String(5), primary_key=True)
    # A hash of the group's values (`rollups.group_key`): one key however many of them are NULL (a unique index
    # over them would let NULLs repeat).
    group_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    team: Mapped[str | None] = mapped_column(String(200))
    key_id: Mapped[str | None] = mapped_column(String(40))
    feature: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    # What prices the calls: the served model, else the requested one.
    priced_model: Mapped[str | None] = mapped_column(String(200))
    price_source: Mapped[str] = mapped_column(String(20))
    calls: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_creation_5m_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_creation_1h_input_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_input_tokens: Mapped[int] = mapped_column(BigInteger)
    web_search_requests: Mapped[int] = mapped_column(BigInteger)
    # NULL while none of the group's calls had a price, as a sum over the records would be.
    cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    retries: Mapped[int] = mapped_column(BigInteger)
    retry_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    unpriced_calls: Mapped[int] = mapped_column(BigInteger)
    family_priced_calls: Mapped[int] = mapped_column(BigInteger)
    batch_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    batch_web_search_requests: Mapped[int] = mapped_column(BigInteger)
    interrupted_calls: Mapped[int] = mapped_column(BigInteger)
    first_started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_started_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TeamRollup(_Rollup, Base):
    """By team, key, feature and model: what budgets, team reports and the overview read."""

    __tablename__ = "rollup_teams"
    __table_args__ = (
        Index("ix_rollup_teams_team", "team", "grain", "day"),
        Index("ix_rollup_teams_key", "key_id", "grain", "day"),
        # Reads of every month row (the ledger page's all-time counts) without walking the day rows.
        Index("ix_rollup_teams_grain", "grain", "day"),
        {"sqlite_with_rowid": False},
    )


class UserRollup(_Rollup, Base):
    """The same, and by end user."""

    __tablename__ = "rollup_users"
    __table_args__ = (
        Index("ix_rollup_users_team", "team", "grain", "day"),
        Index("ix_rollup_users_user", "user", "grain", "day"),
        {"sqlite_with_rowid": False},
    )

    user: Mapped[str | None] = mapped_column(String(256))


class SessionRollup(_Rollup, Base):
    """The same, and by end user, session and agent."""

    __tablename__ = "rollup_sessions"
    __table_args__ = (
        Index("ix_rollup_sessions_team", "team", "grain", "day"),
        # A report's page of sessions or agents reads its groups in order from these (`rollup_reads.first_groups`):
        # by code point, NULL first, as SQLite orders by default and as PostgreSQL must be told.
        *(
            index
            for column in ("session", "agent")
            for index in (
                Index(f"ix_rollup_sessions_{column}", "grain", column, "day").ddl_if(dialect="sqlite"),
                Index(f"ix_rollup_sessions_{column}", "grain", text(f'{column} COLLATE "C" NULLS FIRST'), "day").ddl_if(
                    dialect="postgresql"
                ),
            )
        ),
        {"sqlite_with_rowid": False},
    )

    user: Mapped[str | None] = mapped_column(String(256))
    session: Mapped[str | None] = mapped_column(String(200))
    agent: Mapped[str | None] = mapped_column(String(200))


class BudgetCounter(Base):
    """Spend and holds of one team or key in one calendar period; the row budget checks lock."""

    __tablename__ = "budget_counters"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(Money)
    reserved_usd: Mapped[Decimal] = mapped_column(Money)
    soft_alerted: Mapped[bool] = mapped_column(Boolean, default=False)


class BudgetHold(Base):
    """A hold on one counter: of one call in flight (deleted when the call is settled), or of a process's lease
    (call id `lease-…`, shrunk as its calls are settled, ended at the process's exit or reaped at its death)."""

    __tablename__ = "budget_holds"

    call_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    amount_usd: Mapped[Decimal] = mapped_column(Money)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The serving process whose call holds it (it never expires while that process's heartbeat is fresh), and
    # what the call's record needs if that process dies mid-call.
    instance_id: Mapped[str | None] = mapped_column(String(40))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    team: Mapped[str | None] = mapped_column(String(200))
    key_id: Mapped[str | None] = mapped_column(String(40))
    endpoint: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    user: Mapped[str | None] = mapped_column(String(256))
    feature: Mapped[str | None] = mapped_column(String(200))
    session: Mapped[str | None] = mapped_column(String(200))
    agent: Mapped[str | None] = mapped_column(String(200))
    parent_agent: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (Index("ix_budget_holds_instance", "instance_id"),)


class RateBucket(Base):
    """The shared token bucket of one rate limit (`proxy/ledger/rates.py`): its level when last touched."""

    __tablename__ = "rate_buckets"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    level: Mapped[Decimal] = mapped_column(Money)
    # The limit per minute it last refilled by (what a refill outside an exchange goes by).
    capacity: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RateLease(Base):
    """What one serving process holds out of a rate limit's bucket, not yet known to be consumed."""

    __tablename__ = "rate_leases"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_rate_leases_instance", "instance_id"),)


class Instance(Base):
    """A serving process and its heartbeat: a process whose heartbeat is stale is dead, and its holds are turned
    into `interrupted` records by any live replica."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)


def effective_cost() -> ColumnElement[Decimal]:
    """A record's cost as it stands: the repriced one when a correction was made, else the one recorded."""
    return func.coalesce(UsageRow.repriced_cost_usd, UsageRow.cost_usd)


class AdminEvent(Base):
    """One change made through the CLI or the admin API: who, what, when, before and after."""

    __tablename__ = "admin_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(String(200))
    # JSON: {"before": ..., "after": ...}
    details: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    chain_pos: Mapped[int] = mapped_column(BigInteger, unique=True)
    chain_hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The end of the audit chain: the last position handed out and its hash. Its row lock orders the chain."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pos: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class Batch(Base):
    """A Message Batch created through the proxy: which team owns it and what it holds against the budget."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    key_id: Mapped[str] = mapped_column(String(40))
    # The create call whose budget hold covers the batch until its results are recorded.
    hold_call_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    results_recorded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The reconciler working on it, so replicas do not all fetch the same results.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The create call's feature, user and session tags, recorded on every result.
    feature: Mapped[str | None] = mapped_column(String(200))
    user: Mapped[str | None] = mapped_column(String(256))
    session: Mapped[str | None] = mapped_column(String(200))
    agent: Mapped[str | None] = mapped_column(String(200))
    parent_agent: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_batches_team", "team_id", "created_at"),
        Index("ix_batches_unrecorded", "results_recorded_at", "created_at"),
    )


class RepriceEntry(Base):
    """One record's corrected cost, as one reprice event (at chain position `event_pos`) set it. Append-only."""

    __tablename__ = "reprice_entries"

    event_pos: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    record_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    cost_usd: Mapped[Decimal] = mapped_column(Money)
    price_version: Mapped[str] = mapped_column(String(40))


class ReconciledDay(Base):
    """One UTC day held against Anthropic's own figures by the scheduled reconciliation (one replica at a time)."""

    __tablename__ = "reconciled_days"

    day: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    # The replica checking it, until then (so replicas share the work and a dead one's claim lapses).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    drifted: Mapped[bool | None] = mapped_column(Boolean)
    ledger_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    anthropic_cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    differences: Mapped[int | None] = mapped_column(Integer)
    # JSON: the differences, as `spendgate reconcile --format json` lists them.
    details: Mapped[str | None] = mapped_column(Text)
