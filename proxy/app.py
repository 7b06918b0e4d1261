"""The ASGI application: routes, and the lifespan that owns every shared resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import TypedDict

import anyio.to_thread
import httpx
from prometheus_client import start_http_server
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.config import Settings
from proxy.errors import MethodNotAllowed, ProxyError, RouteNotFound
from proxy.gateway.batches import Batches, ResultsFetcher
from proxy.gateway.gate import Gate, GateRules
from proxy.gateway.handler import Gateway
from proxy.gateway.leases.lifecycle import Leases
from proxy.gateway.models import Models
from proxy.gateway.relay import Relay
from proxy.gateway.upstream import AiohttpUpstream, HTTPXUpstream, Upstream
from proxy.gateway.waits import outliving
from proxy.identity.oidc import OidcClient
from proxy.instruments import MULTIPROCESS_ENV, LabelPolicy, Metrics
from proxy.ledger.alerts import AlertSender
from proxy.ledger.budgets import release_expired
from proxy.ledger.db import make_engine
from proxy.ledger.instances import Heartbeat
from proxy.ledger.journal import Journal
from proxy.ledger.journal_replay import replay_gone
from proxy.ledger.keys import KeyCache
from proxy.ledger.partitions import make_ahead
from proxy.ledger.writer import Writer
from proxy.ledger.writes import writes_for
from proxy.logs import Trouble
from proxy.pricing.table import PriceTable
from proxy.reconcile.anthropic import AdminClient
from proxy.reconcile.scheduled import run_once
from proxy.surfaces.admin.routes import admin_routes
from proxy.surfaces.dashboard.pages import dashboard_routes
from proxy.surfaces.metrics import forget_dead_workers, metrics_route, scrape_registry
from proxy.surfaces.oauth import oauth_routes
from proxy.surfaces.sessions import Access

logger = logging.getLogger("spendgate")
# How often the partitions of the coming months are checked for (PostgreSQL; a catalog lookup).
PARTITIONS_EVERY_SECONDS = 3600.0


class State(TypedDict):
    engine: Engine
    gateway: Gateway
    writer: Writer
    keys: KeyCache
    prices: PriceTable
    metrics: Metrics


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ASGIApp:
    """Build the proxy. `transport` replaces the production upstream client (tests pass MockTransport); `clock`
    is the dashboard's now (tests fix it to check forecasts)."""
    prices = PriceTable.load(settings.prices_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        engine = make_engine(settings.db_url)
        policy = LabelPolicy(lists_model=prices.lists, features=settings.metrics_features, users=settings.metrics_users)
        # One per app: several apps may share a process (tests), each counting only its own calls.
        metrics = Metrics(policy)
        upstream: Upstream
        if transport is None:
            upstream = AiohttpUpstream(
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
                max_connections=settings.upstream_max_connections,
            )
        else:
            upstream = HTTPXUpstream(
                transport,
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
            )
        alerts = AlertSender(settings.alert_webhook)
        keys = KeyCache(engine, ttl=settings.key_cache_seconds)
        # This process's name in journals, holds and heartbeats (not the pid: every container's is 1).
        instance = f"{socket.gethostname()[:20]}-{secrets.token_hex(6)}"
        journal = Journal(settings.spill_dir, instance)
        # A worker restarted after its sibling died replays the sibling's journal (its lock is free now).
        replay = partial(
            replay_gone, engine, settings.spill_dir, prices, name=instance, soft_fraction=settings.soft_limit_fraction
        )
        alerts.notify((await anyio.to_thread.run_sync(replay)).crossed)
        leases = Leases(
            engine,
            instance=instance,
            ttl=timedelta(seconds=settings.reservation_ttl_seconds),
            note=journal.leased,
            metrics=metrics,
            wait_seconds=settings.ledger_wait_seconds,
        )
        writer = Writer(
            writes_for(
                settings.db_url,
                engine,
                settings.ledger_writer,
                workers=settings.workers,
                soft_fraction=settings.soft_limit_fraction,
            ),
            flush_seconds=settings.record_flush_seconds,
            batch_size=settings.record_batch_size,
            drain_seconds=settings.record_drain_seconds,
            spill_dir=settings.spill_dir,
            instance=instance,
            max_pending=settings.max_pending_records,
            stall_seconds=settings.ledger_stall_seconds,
            on_soft_limit=alerts.notify,
            journal=journal,
            on_committed=leases.budgets.committed,
            metrics=metrics,
        )
        fetcher = ResultsFetcher(
            engine=engine,
            upstream=upstream,
            upstream_url=settings.upstream_url,
            upstream_key=settings.anthropic_api_key,
            prices=prices,
            submit=writer.submit,
        )
        gate = Gate(
            keys=keys,
            prices=prices,
            engine=engine,
            leases=leases,
            rules=GateRules(
                max_body_bytes=settings.max_body_bytes,
                body_timeout_seconds=settings.body_timeout_seconds,
                default_max_output_tokens=settings.default_max_output_tokens,
                reservation_ttl=timedelta(seconds=settings.reservation_ttl_seconds),
                fail_open=settings.budget_fail_open,
                instance=instance,
                ledger_wait_seconds=settings.ledger_wait_seconds,
            ),
            metrics=metrics,
        )
        relay = Relay(
            upstream, upstream_url=settings.upstream_url, upstream_key=settings.anthropic_api_key, ledger=writer
        )
        batches = Batches(
            gate=gate,
            relay=relay,
            engine=engine,
            prices=prices,
            submit=writer.submit,
            results=fetcher,
            public_url=settings.public_url,
        )
        models = Models(relay, prices, wait_seconds=settings.models_wait_seconds)
        gateway = Gateway(gate=gate, relay=relay, batches=batches, models=models, prices=prices, ledger=writer)
        if settings.anthropic_api_key is None:
            logger.warning("ANTHROPIC_API_KEY is not set: calls are forwarded without an upstream key")
        forget_dead_workers()
        heart = Heartbeat(
            engine,
            prices,
            instance,
            interval=settings.heartbeat_seconds,
            limit=timedelta(seconds=settings.heartbeat_limit_seconds),
            soft_fraction=settings.soft_limit_fraction,
        )
        await anyio.to_thread.run_sync(heart.start, datetime.now(UTC))
        writer.start()
        alerts.start()
        background = [
            asyncio.create_task(_release_expired_holds(engine, settings.reservation_sweep_seconds)),
            asyncio.create_task(
                _every(
                    settings.heartbeat_seconds,
                    partial(_heartbeat, heart, writer, leases, alerts),
                    "heartbeat",
                )
            ),
            asyncio.create_task(leases.keep()),
            asyncio.create_task(
                _every(1.0, partial(_ledger_gauges, metrics, writer, settings.spill_dir), "ledger gauges")
            ),
            asyncio.create_task(
                _every(PARTITIONS_EVERY_SECONDS, partial(_partitions_ahead, engine), "partitions ahead", at_once=True)
            ),
        ]
        # With workers, their supervisor serves this address for all of them (`proxy/serving.py`).
        listener = None
        if settings.metrics_addr is not None and not os.environ.get(MULTIPROCESS_ENV):
            listener = start_http_server(
                settings.metrics_addr[1],
                settings.metrics_addr[0],
                registry=scrape_registry(metrics, engine, settings.metrics_users),
            )[0]
        if settings.reconcile_every_seconds > 0 and settings.anthropic_admin_key is not None:
            admin = AdminClient(
                settings.anthropic_admin_key,
                base_url=settings.admin_api_url,
                api_key_id=settings.anthropic_api_key_id,
            )
            check = partial(_reconcile_days, engine, admin, settings.reconcile_tolerance, alerts, clock)
            background.append(asyncio.create_task(_every(settings.reconcile_every_seconds, check, "reconciliation")))
        if settings.batch_reconcile_seconds > 0:
            lease = timedelta(seconds=max(60.0, settings.batch_reconcile_seconds * 2))
            reconcile = partial(fetcher.reconcile, lease)
            background.append(
                asyncio.create_task(_every(settings.batch_reconcile_seconds, reconcile, "batch reconcile"))
            )
        try:
            yield {
                "engine": engine,
                "gateway": gateway,
                "writer": writer,
                "keys": keys,
                "prices": prices,
                "metrics": metrics,
            }
        finally:
            # Starlette runs this after the server has stopped taking requests and in-flight ones have
            # ended, so every record is already queued: drain them, then release the rest.
            if listener is not None:
                listener.shutdown()
                listener.server_close()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Grants of calls that stopped waiting for the ledger, and the upkeep's last round, land before the
            # leases end, or they would outlive them.
            late = await outliving(settings.record_drain_seconds)
            await writer.close()
            # Every record is written: what the leases still hold is nobody's. Only then may the journal go: while a
            # lease is in the ledger, a replay of the journal is what corrects it.
            ended = await leases.close()
            if late:
                logger.warning(
                    "%d ledger exchanges were still running after %g s: the journal is kept, so that a replay ends "
                    "the leases they may grant",
                    late,
                    settings.record_drain_seconds,
                )
            elif not ended:
                logger.warning(
                    "the ledger did not answer: the journal is kept, so that a replay ends this process's leases"
                )
            journal.close(keep=late > 0 or not ended)
            with contextlib.suppress(SQLAlchemyError):
                # Every call of this process is recorded; its holds (none are left) no longer need a heartbeat.
                await anyio.to_thread.run_sync(heart.stop)
            await alerts.close()
            await upstream.aclose()
            engine.dispose()

    access, oidc = _sign_in(settings)
    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/livez", livez),
            metrics_route([token for token in (settings.metrics_token, settings.admin_token) if token]),
            *admin_routes(settings.admin_token, access),
            *dashboard_routes(access, oidc, spill_dir=settings.spill_dir, clock=clock),
            *(oauth_routes(settings.public_url, interval=settings.device_poll_seconds) if oidc else ()),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, ProxyError: _proxy_error},
    )
    # A redirect would send the client's key to a URL of our making; a wrong path is just not found.
    app.router.redirect_slashes = False
    return Dispatch(app)


class Dispatch:
    """Everything under /v1, however it is spelled, goes to the gateway (which refuses what is not canonical);
    Claude Code's start-up probe is answered here; the rest, and the lifespan, go to the admin API and health
    checks."""

    def __init__(self, app: Starlette) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = scope.get("raw_path") or b""
            if target[:3].lower() == b"/v1" or scope["path"][:3].lower() == "/v1" or target[:2] == b"/%":
                gateway: Gateway = scope["state"]["gateway"]
                await gateway(scope, receive, send)
                return
            if scope["method"] == "HEAD" and scope["path"] == "/":
                await _probe(send)
                return
        await self._app(scope, receive, send)


async def _probe(send: Send) -> None:
    """`HEAD /`: Claude Code checks that its `ANTHROPIC_BASE_URL` answers before it starts. Nothing is asked of the
    ledger or the upstream, so the answer means only that spendgate is up (`/healthz` says whether it can serve);
    `GET /` stays a 404, as every path spendgate does not serve."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _heartbeat(heart: Heartbeat, writer: Writer, leases: Leases, alerts: AlertSender) -> None:
    """Reap dead processes (this one beats from a thread of its own) and send the soft-limit alerts their records
    set off; once taken for dead, this process's records correct estimates and its leases (counted as used by the
    reaper) admit nothing more."""
    alerts.notify(await anyio.to_thread.run_sync(heart.reap, datetime.now(UTC)))
    if heart.taken_for_dead and not writer.correct_estimates:
        leases.forget()
    writer.correct_estimates = heart.taken_for_dead


async def _ledger_gauges(metrics: Metrics, writer: Writer, spill_dir: Path) -> None:
    metrics.ledger_state(pending=writer.pending, oldest_seconds=writer.oldest_age, spill_dir=spill_dir)


async def _reconcile_days(
    engine: Engine, admin: AdminClient, tolerance: Decimal, alerts: AlertSender, clock: Callable[[], datetime]
) -> None:
    checked = await anyio.to_thread.run_sync(partial(run_once, engine, admin, tolerance_usd=tolerance, now=clock))
    for day in checked:
        if day.drifted:
            alerts.send(day.alert())


async def _release_expired_holds(engine: Engine, interval: float) -> None:
    async def release() -> None:
        released = await anyio.to_thread.run_sync(release_expired, engine, datetime.now(UTC))
        if released:
            logger.warning("released the budget holds of %d calls that never settled", released)

    await _every(interval, release, "hold expiry")


async def _partitions_ahead(engine: Engine) -> None:
    await anyio.to_thread.run_sync(make_ahead, engine, datetime.now(UTC))


async def _every(interval: float, work: Callable[[], Awaitable[object]], name: str, *, at_once: bool = False) -> None:
    """Run background work every `interval` seconds until cancelled (`at_once`: and first right away); a failure
    is logged when it starts and when it ends, not at every attempt (a bug's traceback once)."""
    trouble = Trouble(logger, f"background task {name}")
    while True:
        if not at_once:
            await asyncio.sleep(interval)
        at_once = False
        try:
            await work()
        except Exception as exc:
            trouble.failed(
                exc, detail=f" (it runs every {interval:g} s)", traceback=not isinstance(exc, SQLAlchemyError)
            )
        else:
            trouble.succeeded()


def _sign_in(settings: Settings) -> tuple[Access | None, OidcClient | None]:
    """How browsers sign in (None: they cannot, the dashboard and admin API answer 404) and the identity provider
    people sign in with (None: only the admin token)."""
    oidc = settings.oidc
    client = OidcClient(oidc, f"{settings.public_url}/dashboard/oidc/callback") if oidc is not None else None
    if settings.admin_token is None and oidc is None:
        return None, None
    admins = oidc.admin_groups if oidc is not None else frozenset()
    return Access(settings.admin_token, admins, settings.public_url), client


async def _proxy_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ProxyError):  # always: Starlette calls this only for ProxyError
        return exc.response()
    raise exc


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 answers (paths outside /v1), in Anthropic's error shape."""
    error: ProxyError
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = MethodNotAllowed(
            f"{request.url.path[:200]} does not take {request.method[:20]}.", headers=((b"allow", allow.encode()),)
        )
    else:
        error = RouteNotFound(
            f"No route {request.url.path[:200]}. spendgate serves /v1/*, /admin/*, /dashboard, /metrics, /healthz "
            "and /livez."
        )
    return error.response()


async def healthz(request: Request) -> JSONResponse:
    """Readiness: 200 while records reach the ledger; 503 with the reason when they do not."""
    engine: Engine = request.state.engine
    writer: Writer = request.state.writer
    status = {"pending_records": writer.pending, "oldest_pending_seconds": round(writer.oldest_age, 3)}
    try:
        await anyio.to_thread.run_sync(_ping, engine)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "error": exc.__class__.__name__, **status}, status_code=503)
    problem = writer.problem
    if problem is not None:
        return JSONResponse({"status": "unavailable", "error": problem, **status}, status_code=503)
    return JSONResponse({"status": "ok", **status})


async def livez(request: Request) -> JSONResponse:
    """Liveness: 200 while the process serves at all. A slow ledger is not a reason to kill a process that holds
    records in memory; readiness (`/healthz`) says that."""
    return JSONResponse({"status": "alive"})


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
