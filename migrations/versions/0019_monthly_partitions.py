"""monthly partitions: on PostgreSQL the usage records become a table partitioned by the month of started_at

Revision ID: 0019
Revises: 0018

The records are copied into the partitioned table in this migration's transaction (writers wait for it: about
40 s a million records on a 2-core machine); their ids, chain positions and sequence carry over. A partitioned
table's unique keys must hold its partition key, so the primary key and the id's and the chain position's
uniqueness include started_at: an id is written once because the writer looks a batch's ids up (in every month)
under the chain's lock before inserting, as it did before. SQLite is unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None
MONTHS_AHEAD = 2
# The indexes of usage_records besides its keys, as migrations 0001-0015 made them.
INDEXES = {
    "ix_usage_team_spend": "team, started_at, repriced_cost_usd, cost_usd",
    "ix_usage_key_started": "key_id, started_at",
    "ix_usage_started": "started_at",
    "ix_usage_key_fingerprint": "key_id, fingerprint, started_at",
    "ix_usage_session": "session, started_at",
    "ix_usage_records_repriced_by": "repriced_by",
}


def _next_month(start: datetime) -> datetime:
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def _months_with_records(bind: sa.Connection) -> list[datetime]:
    """The first instants of the months that have records: a seek for each (one record of a clock once years
    wrong must not make a partition for every month between)."""
    found: list[datetime] = []
    at = datetime(1, 1, 1)
    while True:
        query = sa.text("SELECT min(started_at) FROM usage_records_plain WHERE started_at >= :at")
        started = bind.execute(query, {"at": at}).scalar()
        if started is None:
            return found
        found.append(started.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
        at = _next_month(found[-1])


def _moved(source: str, target: str) -> None:
    """Copy every record from `source` into `target` (same columns, same order)."""
    op.execute(f"INSERT INTO {target} SELECT * FROM {source}")  # noqa: S608 (names of this module)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE usage_records RENAME TO usage_records_plain")
    op.execute("ALTER TABLE usage_records_plain RENAME CONSTRAINT usage_records_pkey TO usage_records_plain_pkey")
    op.execute("ALTER TABLE usage_records_plain RENAME CONSTRAINT usage_records_id_key TO usage_records_plain_id_key")
    for name in (*INDEXES, "ix_usage_chain_pos"):
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_plain")
    op.execute(
        "CREATE TABLE usage_records (LIKE usage_records_plain INCLUDING DEFAULTS) PARTITION BY RANGE (started_at)"
    )
    # The sequence of `seq` goes with the new table (dropping the old one would drop it).
    op.execute("ALTER SEQUENCE usage_records_seq_seq OWNED BY usage_records.seq")
    # This month and the next ones are made ahead; before it, the months that have records. The column holds UTC
    # wall time without a zone.
    months = set(_months_with_records(bind))
    month = datetime.now(UTC).replace(tzinfo=None, day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(MONTHS_AHEAD + 1):
        months.add(month)
        month = _next_month(month)
    for start in sorted(months):
        op.execute(
            f"CREATE TABLE usage_records_{start.year:04}_{start.month:02} PARTITION OF usage_records"
            f" FOR VALUES FROM ('{start.isoformat(sep=' ')}') TO ('{_next_month(start).isoformat(sep=' ')}')"
        )
    _moved("usage_records_plain", "usage_records")
    op.execute("DROP TABLE usage_records_plain")
    # Keys and indexes once the rows are in: building them is quicker than keeping them up row by row.
    op.execute("ALTER TABLE usage_records ADD CONSTRAINT usage_records_pkey PRIMARY KEY (seq, started_at)")
    op.execute("ALTER TABLE usage_records ADD CONSTRAINT usage_records_id_key UNIQUE (id, started_at)")
    op.execute("CREATE UNIQUE INDEX ix_usage_chain_pos ON usage_records (chain_pos, started_at)")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON usage_records ({columns})")
    op.execute("ANALYZE usage_records")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE usage_records RENAME TO usage_records_partitioned")
    op.execute(
        "ALTER TABLE usage_records_partitioned RENAME CONSTRAINT usage_records_pkey TO usage_records_partitioned_pkey"
    )
    op.execute(
        "ALTER TABLE usage_records_partitioned RENAME CONSTRAINT usage_records_id_key"
        " TO usage_records_partitioned_id_key"
    )
    for name in (*INDEXES, "ix_usage_chain_pos"):
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_partitioned")
    op.execute("CREATE TABLE usage_records (LIKE usage_records_partitioned INCLUDING DEFAULTS)")
    op.execute("ALTER SEQUENCE usage_records_seq_seq OWNED BY usage_records.seq")
    _moved("usage_records_partitioned", "usage_records")
    # Dropping the partitioned table drops its partitions.
    op.execute("DROP TABLE usage_records_partitioned")
    op.execute("ALTER TABLE usage_records ADD CONSTRAINT usage_records_pkey PRIMARY KEY (seq)")
    op.execute("ALTER TABLE usage_records ADD CONSTRAINT usage_records_id_key UNIQUE (id)")
    op.execute("CREATE UNIQUE INDEX ix_usage_chain_pos ON usage_records (chain_pos)")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON usage_records ({columns})")
    op.execute("ANALYZE usage_records")
