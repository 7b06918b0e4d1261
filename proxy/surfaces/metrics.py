"""Prometheus metrics: what every call cost and how long it took, the ledger's health, and every budget's state.

Counters and histograms are fed by the records themselves (`Metrics.recorded`, called once per record as it is
queued), so they agree with the ledger by construction; budget gauges are read from the ledger at scrape time,
so every replica reports the same ledger-wide numbers. Labels are bounded whatever clients send: models the
price table does not list (and the upstream did not name) are `other`, unknown routes are `other`, features and
users appear only when on an allow-list, and a key has series only when it has a budget of its own.

With several worker processes, prometheus_client's multiprocess mode aggregates them: `serving.run` points
`PROMETHEUS_MULTIPROC_DIR` at a fresh folder before the workers start.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio.to_thread
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import error_response
from proxy.gateway.routes import BATCHES, COUNT_TOKENS, MESSAGES
from proxy.ledger.budgets import current_spend, key_counter, period_end, period_start
from proxy.ledger.schema import APIKey, Team, UserBudget
from proxy.ledger.teams import list_teams, list_users
from proxy.reconcile.scheduled import recent
from proxy.types import TOKEN_KIND_FIELDS, Period, UsageRecord

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format every Prometheus version reads (our names need none of format 1.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
NONE = "none"
# Whole calls: from a few milliseconds to the SDKs' 10-minute timeout.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# spendgate's own share of a call: from 0.1 ms (the target) to a second (something is wrong).
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# A `_created` series beside every counter doubles what Prometheus stores for a timestamp nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]
_KNOWN_ENDPOINTS = frozenset({MESSAGES, COUNT_TOKENS, BATCHES})
_BATCH_ACTIONS = ("/results", "/cancel")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelPolicy:
    """Which client-chosen values may become label values: listed models, and allow-listed features and users."""

    lists_model: Callable[[str], bool] = lambda model: False
    features: Collection[str] = ()
    users: Collection[str] = ()


class _CallSeries:
    """The children of one (team, model, endpoint, outcome, streamed): looked up once per record, not per metric."""

    __slots__ = ("calls", "ended", "first_byte", "overhead", "spend", "tokens", "upstream")

    def __init__(self, metrics: Metrics, team: str, model: str, endpoint: str, outcome: str, streamed: str) -> None:
        self.calls = metrics.calls.labels(team, model, endpoint, outcome)
        self.spend = metrics.spend.labels(team, model)
        self.tokens = tuple(
            (attribute, metrics.tokens.labels(team, model, kind)) for kind, attribute in TOKEN_KIND_FIELDS.items()
        )
        self.ended = metrics.duration.labels(endpoint, streamed)
        self.first_byte = metrics.first_byte.labels(endpoint, streamed)
        self.upstream = metrics.upstream.labels(endpoint, streamed)
        self.overhead = metrics.overhead.labels(endpoint, streamed)


class Metrics:
    """One process's instruments, in a registry of its own (several apps may share a test process)."""

    def __init__(self, policy: LabelPolicy = LabelPolicy()) -> None:
        self._policy = policy
        self.users = policy.users
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "spendgate_calls",
            "Calls by team, model, endpoint and outcome.",
            ["team", "model", "endpoint", "outcome"],
            registry=r,
        )
        self.spend = Counter("spendgate_spend_usd", "Spend in USD by team and model.", ["team", "model"], registry=r)
        self.tokens = Counter(
            "spendgate_tokens", "Tokens by team, model and kind.", ["team", "model", "kind"], registry=r
        )
        self.retry_calls = Counter("spendgate_retry_calls", "Calls flagged as retries, by team.", ["team"], registry=r)
        self.retry_spend = Counter(
            "spendgate_retry_spend_usd", "Spend in USD of calls flagged as retries, by team.", ["team"], registry=r
        )
        self.fallback = Counter(
            "spendgate_price_fallback_calls",
            "Calls priced by a family fallback or not priced at all, by model: the price table is stale.",
            ["model", "price_source"],
            registry=r,
        )
        self.refusals = Counter("spendgate_refusals", "Calls spendgate refused, by reason.", ["reason"], registry=r)
        self.upstream_errors = Counter(
            "spendgate_upstream_errors",
            "Calls the upstream failed or could not be reached for, by error type and status.",
            ["error_type", "status"],
            registry=r,
        )
        self.disconnects = Counter(
            "spendgate_client_disconnects", "Calls the client left before the end.", ["endpoint"], registry=r
        )
        self.feature_calls = Counter(
            "spendgate_feature_calls", "Calls by allow-listed feature (others: other).", ["feature"], registry=r
        )
        self.feature_spend = Counter(
            "spendgate_feature_spend_usd", "Spend in USD by allow-listed feature.", ["feature"], registry=r
        )
        self.user_calls = Counter(
            "spendgate_user_calls", "Calls by allow-listed end user (others: other).", ["user"], registry=r
        )
        self.user_spend = Counter(
            "spendgate_user_spend_usd", "Spend in USD by allow-listed end user.", ["user"], registry=r
        )
        timing = ["endpoint", "streamed"]
        self.duration = Histogram(
            "spendgate_request_duration_seconds",
            "Whole calls, arrival to last byte.",
            timing,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.first_byte = Histogram(
            "spendgate_time_to_first_byte_seconds",
            "Arrival to the first byte sent back.",
            timing,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "spendgate_upstream_duration_seconds",
            "Time spent waiting on the upstream.",
            timing,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "spendgate_overhead_seconds",
            "spendgate's own added time per call: total minus upstream time.",
            timing,
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "spendgate_ledger_pending_records",
            "Records queued for the ledger.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.oldest = Gauge(
            "spendgate_ledger_oldest_pending_seconds",
            "Age of the oldest record queued for the ledger.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.files = Gauge(
            "spendgate_ledger_files_pending",
            "Files under the spill folder: spilled records, records set aside, crash journal segments.",
            ["kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.batches = Counter("spendgate_ledger_write_batches", "Transactions that wrote records.", registry=r)
        self.write_errors = Counter(
            "spendgate_ledger_write_errors", "Write attempts the ledger failed (records stay queued).", registry=r
        )
        self.set_aside = Counter(
            "spendgate_ledger_records_set_aside", "Records the ledger refused as data, set aside on disk.", registry=r
        )
        self.holds = Counter(
            "spendgate_budget_holds",
            "Budgeted calls admitted: with a hold of their own (call) or against this process's lease (lease).",
            ["via"],
            registry=r,
        )
        self.round_trips = Counter(
            "spendgate_ledger_round_trips",
            "Budget transactions on the ledger, by operation.",
            ["operation"],
            registry=r,
        )
        # Children taken on the request path, made once.
        self.leased = self.holds.labels("lease")
        self.held = self.holds.labels("call")
        self.hold_trips = self.round_trips.labels("hold")
        self._series: dict[tuple[str, str, str, str, bool], _CallSeries] = {}

    def recorded(self, record: UsageRecord) -> None:
        """Count one record (every record passes here once, as it is queued for the ledger)."""
        team = record.team or NONE
        model = record.response_model or record.model or NONE
        if model is not record.response_model and model != NONE and not self._policy.lists_model(model):
            model = OTHER  # what a client typed, not a model anyone serves: never a label of its own
        endpoint = endpoint_label(record.endpoint)
        key = (team, model, endpoint, record.outcome, record.streamed)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _CallSeries(
                self, team, model, endpoint, record.outcome, "true" if record.streamed else "false"
            )
        series.calls.inc()
        cost = float(record.cost_usd) if record.cost_usd else 0.0
        if cost:
            series.spend.inc(cost)
        usage = record.usage
        for attribute, child in series.tokens:
            count = getattr(usage, attribute)
            if count:
                child.inc(count)
        if record.price_source in ("family", "unpriced"):
            self.fallback.labels(model, record.price_source).inc()
        if record.outcome == "rejected":
            self.refusals.labels(record.error_type or OTHER).inc()
        elif record.outcome in ("upstream_error", "upstream_unreachable"):
            self.upstream_errors.labels(record.error_type or NONE, str(record.status)).inc()
        elif record.outcome == "client_disconnected":
            self.disconnects.labels(endpoint).inc()
        if record.feature is not None and self._policy.features:
            feature = record.feature if record.feature in self._policy.features else OTHER
            self.feature_calls.labels(feature).inc()
            self.feature_spend.labels(feature).inc(cost)
        if record.user is not None and self._policy.users:
            user = record.user if record.user in self._policy.users else OTHER
            self.user_calls.labels(user).inc()
            self.user_spend.labels(user).inc(cost)
        if record.upstream_ms is not None:  # a live call (batch results have no timings of their own)
            series.ended.observe(record.latency_ms / 1000)
            if record.ttfb_ms is not None:
                series.first_byte.observe(record.ttfb_ms / 1000)
            series.upstream.observe(record.upstream_ms / 1000)
            series.overhead.observe(max(record.latency_ms - record.upstream_ms, 0.0) / 1000)

    def written(self, retries: Iterable[tuple[str | None, Decimal | None]]) -> None:
        """Count one transaction that wrote records, and the retries among them (flagged only as they are written:
        a repeat of an earlier call is found in the ledger)."""
        self.batches.inc()
        for team, cost in retries:
            self.retry_calls.labels(team or NONE).inc()
            if cost:
                self.retry_spend.labels(team or NONE).inc(float(cost))

    def ledger_state(self, *, pending: int, oldest_seconds: float, spill_dir: Path) -> None:
        """Set the ledger's gauges (every second, from the lifespan)."""
        self.pending.set(pending)
        self.oldest.set(oldest_seconds)
        counts = {"spilled": 0, "set_aside": 0, "journal": 0}
        try:
            names = os.listdir(spill_dir)
        except OSError:
            names = []
        for name in names:
            if name.endswith(".jsonl"):
                if name.startswith("unwritten-"):
                    counts["spilled"] += 1
                elif name.startswith("refused-"):
                    counts["set_aside"] += 1
                elif name.startswith("journal-"):
                    counts["journal"] += 1
        for kind, count in counts.items():
            self.files.labels(kind).set(count)


def endpoint_label(endpoint: str) -> str:
    """A bounded label for a record's endpoint: the routes spendgate knows, batch ids replaced, else `other`."""
    if endpoint in _KNOWN_ENDPOINTS:
        return endpoint
    if endpoint.startswith(BATCHES + "/"):
        action = next((action for action in _BATCH_ACTIONS if endpoint.endswith(action)), "")
        return f"{BATCHES}/{{id}}{action}"
    return OTHER


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
        for team in list_teams(self._engine, now=now):
            values = [team.name, "", team.period]
            spent.add_metric(values, float(team.spent_usd))
            held.add_metric(values, float(team.reserved_usd))
            if team.budget_usd is not None:
                limit.add_metric(values, float(team.budget_usd))
                remaining.add_metric(values, float(team.remaining_usd or 0))
                _add_elapsed(elapsed, values, team.period, now)  # type: ignore[arg-type]
        query = (
            select(APIKey.id, Team.name, APIKey.budget_usd, APIKey.period)
            .join(Team, Team.id == APIKey.team_id)
            .where(APIKey.revoked_at.is_(None))
        )
        with self._engine.connect() as connection:
            keys = [(key, team, budget, period) for key, team, budget, period in connection.execute(query) if budget]
        counters = [key_counter(key_id, period, budget, now) for key_id, _, budget, period in keys]
        spend = current_spend(self._engine, counters)
        for (key_id, team_name, budget, period), counter in zip(keys, counters, strict=True):
            values = [team_name, key_id, period]
            key_spent, key_held = spend[counter.scope]
            limit.add_metric(values, float(budget))
            spent.add_metric(values, float(key_spent))
            held.add_metric(values, float(key_held))
            remaining.add_metric(values, float(budget - key_spent - key_held))
            _add_elapsed(elapsed, values, period, now)
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
        if self._users:
            with self._engine.connect() as connection:
                own = set(
                    connection.execute(select(Team.name).join(UserBudget, UserBudget.team_id == Team.id)).scalars()
                )
                budgeted = set(connection.execute(select(Team.name).where(Team.user_budget_usd.is_not(None))).scalars())
            for team in sorted(own | budgeted):
                for view in list_users(self._engine, team, only=self._users):
                    values = [team, view.user]
                    spent.add_metric(values, float(view.spent_usd))
                    held.add_metric(values, float(view.reserved_usd))
                    if view.budget_usd is not None:
                        limit.add_metric(values, float(view.budget_usd))
        yield from (limit, spent, held)


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
