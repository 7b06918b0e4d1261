"""`/metrics`: this process's instruments (`proxy/instruments.py`) and every budget's state, read from the ledger
at scrape time so every replica reports the same ledger-wide numbers. A key has series only when it has a budget
of its own; end users only when on the allow-list.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio.to_thread
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import error_response
from proxy.instruments import MULTIPROCESS_ENV, Metrics
from proxy.ledger.counters import current_spend, key_counters
from proxy.ledger.end_users import list_users
from proxy.ledger.keys import budget_columns
from proxy.ledger.schema import APIKey, Team, UserBudget
from proxy.ledger.teams import list_teams
from proxy.ledger.windows import WindowView, period_end, period_start, window_views, windows_of
from proxy.reconcile.scheduled import recent
from proxy.types import Period

# The text format every Prometheus version reads (our names need none of format 1.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BudgetCollector(Collector):
    """Every budget's state, read from the ledger when Prometheus scrapes (the same numbers `teams list` shows)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._engine = engine
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        labels = ["team", "key", "period"]
        limit = GaugeMetricFamily("spendgate_budget_limit_usd", "Budget per team and key, this period.", labels=labels)
        spent = GaugeMetricFamily("spendgate_budget_spent_usd", "Spent this period.", labels=labels)
        held = GaugeMetricFamily("spendgate_budget_held_usd", "Held by calls in flight and leases.", labels=labels)
        remaining = GaugeMetricFamily("spendgate_budget_remaining_usd", "Budget minus spent minus held.", labels=labels)
        elapsed = GaugeMetricFamily(
            "spendgate_budget_period_elapsed_ratio", "Fraction of the budget period elapsed.", labels=labels
        )
        windows: list[tuple[list[str], WindowView]] = []
        for team in list_teams(self._engine, now=now):
            # A team's spend in its shorthand period shows with a budget or not; its other windows' below.
            spent.add_metric([team.name, "", team.period], float(team.spent_usd))
            held.add_metric([team.name, "", team.period], float(team.reserved_usd))
            for window in team.windows:
                values = [team.name, "", window.period]
                if window.period != team.period:
                    spent.add_metric(values, float(window.spent_usd))
                    held.add_metric(values, float(window.reserved_usd))
                windows.append((values, window))
        query = (
            select(APIKey.id, Team.name, APIKey.period, *budget_columns(APIKey))
            .join(Team, Team.id == APIKey.team_id)
            .where(APIKey.revoked_at.is_(None))
        )
        with self._engine.connect() as connection:
            keys = [
                (key_id, team, key_counters(key_id, period, budgets, now))
                for key_id, team, period, *amounts in connection.execute(query)
                if (budgets := windows_of(period, *amounts))
            ]
        spend = current_spend(self._engine, [counter for _, _, counters in keys for counter in counters])
        for key_id, team_name, counters in keys:
            for window in window_views(counters, spend):
                values = [team_name, key_id, window.period]
                spent.add_metric(values, float(window.spent_usd))
                held.add_metric(values, float(window.reserved_usd))
                windows.append((values, window))
        for values, window in windows:
            limit.add_metric(values, float(window.budget_usd))
            remaining.add_metric(values, float(window.remaining_usd))
            _add_elapsed(elapsed, values, window.period, now)
        yield from (limit, spent, held, remaining, elapsed)


class UserBudgetCollector(Collector):
    """End users' spend against their allowance this period, for allow-listed users of teams with end-user
    budgets (read from the ledger at scrape time, like the budgets)."""

    def __init__(self, engine: Engine, users: Collection[str]) -> None:
        self._engine = engine
        self._users = frozenset(users)

    def collect(self) -> Iterator[Metric]:
        labels = ["team", "user"]
        limit = GaugeMetricFamily(
            "spendgate_user_budget_limit_usd", "An end user's allowance this period.", labels=labels
        )
        spent = GaugeMetricFamily("spendgate_user_budget_spent_usd", "An end user's spend this period.", labels=labels)
        held = GaugeMetricFamily(
            "spendgate_user_budget_held_usd", "Held by an end user's calls in flight.", labels=labels
        )
        windowed_labels = [*labels, "period"]
        window_limit = GaugeMetricFamily(
            "spendgate_user_budget_window_limit_usd", "An end user's allowance in each window.", labels=windowed_labels
        )
        window_left = GaugeMetricFamily(
            "spendgate_user_budget_window_remaining_usd",
            "An end user's allowance in each window minus spent and held.",
            labels=windowed_labels,
        )
        if self._users:
            with self._engine.connect() as connection:
                own = set(
                    connection.execute(select(Team.name).join(UserBudget, UserBudget.team_id == Team.id)).scalars()
                )
                windowed = or_(*(column.is_not(None) for column in budget_columns(Team, "user_")))
                budgeted = set(connection.execute(select(Team.name).where(windowed)).scalars())
            for team in sorted(own | budgeted):
                for view in list_users(self._engine, team, only=self._users):
                    values = [team, view.user]
                    spent.add_metric(values, float(view.spent_usd))
                    held.add_metric(values, float(view.reserved_usd))
                    if view.budget_usd is not None:
                        limit.add_metric(values, float(view.budget_usd))
                    for window in view.windows:
                        window_limit.add_metric([*values, window.period], float(window.budget_usd))
                        window_left.add_metric([*values, window.period], float(window.remaining_usd))
        yield from (limit, spent, held, window_limit, window_left)


class ReconcileCollector(Collector):
    """The latest day the scheduled reconciliation checked, read from the ledger at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        drift = GaugeMetricFamily(
            "spendgate_reconcile_cost_drift_usd", "Anthropic's cost minus the ledger's, the latest reconciled day."
        )
        drifted = GaugeMetricFamily(
            "spendgate_reconcile_drifted", "1 when the latest reconciled day drifted past the tolerance, else 0."
        )
        day = GaugeMetricFamily(
            "spendgate_reconcile_day_timestamp_seconds", "The start of the latest reconciled day (Unix time)."
        )
        for latest in recent(self._engine, limit=1):
            drift.add_metric([], float(latest.anthropic_cost_usd - latest.ledger_cost_usd))
            drifted.add_metric([], 1.0 if latest.drifted else 0.0)
            day.add_metric([], latest.day.timestamp())
        yield from (drift, drifted, day)


def _add_elapsed(family: GaugeMetricFamily, values: list[str], period: Period, now: datetime) -> None:
    start = period_start(period, now)
    end = None if start is None else period_end(period, start)
    if start is not None and end is not None:  # a `total` budget never ends
        family.add_metric(values, (now - start) / (end - start))


def scrape_registry(metrics: Metrics | None, engine: Engine, users: Collection[str] = ()) -> CollectorRegistry:
    """What a scrape shows: this process's instruments (in multiprocess mode, every worker's, and `metrics` may be
    None), the budgets, and the allowances of the end users in `users` (the allow-list)."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROCESS_ENV):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    elif metrics is not None:
        registry.register(_Forward(metrics.registry))
    registry.register(BudgetCollector(engine))
    registry.register(UserBudgetCollector(engine, users))
    registry.register(ReconcileCollector(engine))
    return registry


def forget_dead_workers() -> None:
    """In multiprocess mode, drop the live gauges of worker processes that are gone (a restarted worker's
    predecessor), so they are not summed with the living."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return
    for path in Path(directory).glob("gauge_live*.db"):
        pid = int(path.stem.rpartition("_")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


def metrics_route(tokens: Collection[str]) -> Route:
    """`GET /metrics` on the proxy's own port, for a bearer of one of `tokens` (the metrics or admin token)."""

    async def endpoint(request: Request) -> Response:
        if not tokens:
            return error_response(
                404,
                "not_found_error",
                "Not found. Set SPENDGATE_METRICS_TOKEN to scrape here, or SPENDGATE_METRICS_ADDR to scrape "
                "a separate address without a token.",
            )
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        given = credential.strip().encode()
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(given, t.encode()) for t in tokens):
            return error_response(
                401, "authentication_error", "Send 'Authorization: Bearer <SPENDGATE_METRICS_TOKEN>'."
            )
        try:
            metrics: Metrics = request.state.metrics
            registry = scrape_registry(metrics, request.state.engine, metrics.users)
            text = await anyio.to_thread.run_sync(generate_latest, registry)
        except SQLAlchemyError as exc:
            return error_response(
                503, "api_error", f"The ledger did not answer, so budgets cannot be shown: {exc.__class__.__name__}."
            )
        return Response(text, headers={"content-type": CONTENT_TYPE})

    return Route("/metrics", endpoint, methods=["GET"])


class _Forward(Collector):
    """Another registry's metrics, collected into this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self._registry.collect())
