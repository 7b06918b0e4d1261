"""A whole spendgate in-process: the fake upstream and the proxy, both under real uvicorn on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select

from proxy.app import create_app
from proxy.config import Settings
from proxy.ledger.export import iter_usage
from proxy.ledger.key_admin import create_key
from proxy.ledger.schema import UsageRow
from proxy.ledger.teams import TeamSettings, create_team
from tests.servers import serve_in_thread
from tests.upstream import UPSTREAM_KEY, FakeAnthropic
from tests.waiting import wait_until


@dataclass
class Stack:
    url: str
    key: str
    key_id: str
    upstream: FakeAnthropic
    upstream_url: str
    engine: Engine

    def records(self, count: int) -> list[dict[str, Any]]:
        """Wait until the ledger holds `count` records, then return them oldest first."""
        wait_until(lambda: self.count() >= count, f"{count} usage records in the ledger")
        return [record for _, record in iter_usage(self.engine)]

    def count(self) -> int:
        """How many usage records the ledger holds now."""
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(UsageRow)).scalar_one())

    def idle(self) -> None:
        """Wait until the proxy has written every record it accepted."""
        wait_until(lambda: httpx.get(f"{self.url}/healthz").json()["pending_records"] == 0, "an empty write queue")


def settings_for(db_url: str, upstream_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Test settings: the fake upstream, its key, a per-test ledger and spill folder."""
    base = Settings(
        db_url=db_url,
        upstream_url=upstream_url,
        anthropic_api_key=UPSTREAM_KEY,
        spill_dir=tmp_path / "spill",
        record_flush_seconds=0.01,
        batch_reconcile_seconds=0,
    )
    return replace(base, **overrides)


@contextlib.contextmanager
def running_stack(
    engine: Engine,
    db_url: str,
    tmp_path: Path,
    *,
    team: TeamSettings | None = None,
    key_budget: Decimal | None = None,
    **overrides: Any,
) -> Iterator[Stack]:
    """Team `research` with one key, the fake upstream, and the proxy in front of it."""
    create_team(engine, "research", team or TeamSettings(), actor="test")
    view, key = create_key(engine, "research", actor="test", name="ci", budget_usd=key_budget)
    with _serve(FakeAnthropic(), engine, db_url, tmp_path, key, view.id, **overrides) as stack:
        yield stack


@contextlib.contextmanager
def running_stack_again(engine: Engine, db_url: str, tmp_path: Path, stack: Stack, **overrides: Any) -> Iterator[Stack]:
    """A new proxy process's worth of state on the same ledger and fake upstream (state kept) as `stack`."""
    with _serve(stack.upstream, engine, db_url, tmp_path, stack.key, stack.key_id, **overrides) as again:
        yield again


@contextlib.contextmanager
def _serve(
    upstream: FakeAnthropic, engine: Engine, db_url: str, tmp_path: Path, key: str, key_id: str, **overrides: Any
) -> Iterator[Stack]:
    with serve_in_thread(upstream) as upstream_url:
        settings = settings_for(db_url, overrides.pop("upstream_url", upstream_url), tmp_path, **overrides)
        with serve_in_thread(create_app(settings)) as url:
            yield Stack(url=url, key=key, key_id=key_id, upstream=upstream, upstream_url=upstream_url, engine=engine)
