"""Alembic environment: runs on the connection `proxy.ledger.db.upgrade` hands over, or on `SPENDGATE_DB_URL`."""

from __future__ import annotations

import os

from alembic import context

from proxy.config import DEFAULT_DB_URL
from proxy.ledger.db import make_engine
from proxy.ledger.schema import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(os.environ.get("SPENDGATE_DB_URL", DEFAULT_DB_URL))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
