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


def _months_with_records(bind: sa.Connection, table: str) -> list[datetime]:
    """The first instants of the months that have records: a seek for each (one record of a clock once years
    wrong must not make a partition for every month between)."""
    found: list[datetime] = []
    at = datetime(1, 1, 1)
    while True:
        query = sa.text(f"SELECT min(started_at) FROM {table} WHERE started_at >= :at")  # noqa: S608 (ours)
        started = bind.execute(query, {"at": at}).scalar()
        if started is None:
            return found
        found.append(started.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
        at = _next_month(found[-1])


def _set_aside(suffix: str) -> str:
    """Rename usage_records, its keys and indexes with `suffix`, freeing their names; returns its new name."""
    aside = f"usage_records_{suffix}"
    op.execute("LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE")
    op.execute(f"ALTER TABLE usage_records RENAME TO {aside}")
    for key in ("pkey", "id_key"):
        op.execute(f"ALTER TABLE {aside} RENAME CONSTRAINT usage_records_{key} TO {aside}_{key}")
    for name in (*INDEXES, "ix_usage_chain_pos"):
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_{suffix}")
    return aside


def _moved_from(aside: str) -> None:
    """Copy every record from the table set aside into the new usage_records (same columns, same order), then
    give the new table the sequence of `seq` (dropping the old one would drop it) and drop the old one."""
    op.execute("ALTER SEQUENCE usage_records_seq_seq OWNED BY usage_records.seq")
    op.execute(f"INSERT INTO usage_records SELECT * FROM {aside}")  # noqa: S608 (names of this module)
    op.execute(f"DROP TABLE {aside}")


def _keyed(*key: str) -> None:
    """The keys and indexes, once the rows are in (quicker than keeping them up row by row); `key`: the columns
    the unique keys end with besides their own."""
    ending = "".join(f", {column}" for column in key)
    op.execute(f"ALTER TABLE usage_records ADD CONSTRAINT usage_records_pkey PRIMARY KEY (seq{ending})")
    op.execute(f"ALTER TABLE usage_records ADD CONSTRAINT usage_records_id_key UNIQUE (id{ending})")
    op.execute(f"CREATE UNIQUE INDEX ix_usage_chain_pos ON usage_records (chain_pos{ending})")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON usage_records ({columns})")
    op.execute("ANALYZE usage_records")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    aside = _set_aside("plain")
    op.execute(f"CREATE TABLE usage_records (LIKE {aside} INCLUDING DEFAULTS) PARTITION BY RANGE (started_at)")
    # This month and the next ones are made ahead; before it, the months that have records. The column holds UTC
    # wall time without a zone.
    months = set(_months_with_records(bind, aside))
    month = datetime.now(UTC).replace(tzinfo=None, day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(MONTHS_AHEAD + 1):
        months.add(month)
        month = _next_month(month)
    for start in sorted(months):
        op.execute(
            f"CREATE TABLE usage_records_{start.year:04}_{start.month:02} PARTITION OF usage_records"
            f" FOR VALUES FROM ('{start.isoformat(sep=' ')}') TO ('{_next_month(start).isoformat(sep=' ')}')"
        )
    _moved_from(aside)
    _keyed("started_at")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    aside = _set_aside("partitioned")
    op.execute(f"CREATE TABLE usage_records (LIKE {aside} INCLUDING DEFAULTS)")
    # Dropping the partitioned table drops its partitions.
    _moved_from(aside)
    _keyed()
