"""Prometheus instruments: what every call cost and how long it took, and the ledger's health, counted as it happens.

Counters and histograms are fed by the records themselves (`Metrics.recorded`, called once per record as it is
queued), so they agree with the ledger by construction. Labels are bounded whatever clients send: models the
price table does not list (and the upstream did not name) are `other`, unknown routes are `other`, features and
users appear only when on an allow-list. What a scrape shows beyond these (budgets read from the ledger) is
`proxy/surfaces/metrics.py`.

With several worker processes, prometheus_client's multiprocess mode aggregates them: `serving.run` points
`PROMETHEUS_MULTIPROC_DIR` at a fresh folder before the workers start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from proxy.types import BATCHES, COUNT_TOKENS, MESSAGES, TOKEN_KIND_FIELDS, UsageRecord

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
