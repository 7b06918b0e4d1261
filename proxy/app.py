"""The ASGI application: routes, and the lifespan that owns every shared resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypedDict

import anyio.to_thread
import httpx
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from proxy.admin import admin_routes
from proxy.alerts import AlertSender
from proxy.batches import ResultsFetcher
from proxy.budgets import release_expired
from proxy.config import Settings
from proxy.db import make_engine
from proxy.forward import Forwarder
from proxy.keys import KeyCache
from proxy.pricing import PriceTable
from proxy.recorder import Recorder
from proxy.upstream import AiohttpUpstream, HTTPXUpstream, Upstream

logger = logging.getLogger("spendgate")


class State(TypedDict):
    engine: Engine
    forwarder: Forwarder
    recorder: Recorder
    keys: KeyCache
    prices: PriceTable


def create_app(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """Build the proxy. `transport` replaces the production upstream client (tests pass MockTransport)."""
    prices = PriceTable.load(settings.prices_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        engine = make_engine(settings.db_url)
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
        recorder = Recorder(
            engine,
            flush_seconds=settings.record_flush_seconds,
            batch_size=settings.record_batch_size,
            drain_seconds=settings.record_drain_seconds,
            spill_dir=settings.spill_dir,
            soft_fraction=settings.soft_limit_fraction,
            on_soft_limit=alerts.notify,
        )
        fetcher = ResultsFetcher(
            engine=engine,
            upstream=upstream,
            upstream_url=settings.upstream_url,
            upstream_key=settings.anthropic_api_key,
            prices=prices,
            submit=recorder.submit,
        )
        forwarder = Forwarder(
            upstream=upstream,
            upstream_url=settings.upstream_url,
            upstream_key=settings.anthropic_api_key,
            keys=keys,
            prices=prices,
            recorder=recorder,
            engine=engine,
            max_body_bytes=settings.max_body_bytes,
            default_max_output_tokens=settings.default_max_output_tokens,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            budget_fail_open=settings.budget_fail_open,
            public_url=settings.public_url,
            batch_results=fetcher,
        )
        if settings.anthropic_api_key is None:
            logger.warning("ANTHROPIC_API_KEY is not set: calls are forwarded without an upstream key")
        recorder.start()
        alerts.start()
        background = [asyncio.create_task(_release_expired_holds(engine, settings.reservation_sweep_seconds))]
        if settings.batch_reconcile_seconds > 0:
            lease = timedelta(seconds=max(60.0, settings.batch_reconcile_seconds * 2))
            reconcile = partial(fetcher.reconcile, lease)
            background.append(asyncio.create_task(_every(settings.batch_reconcile_seconds, reconcile)))
        try:
            yield {"engine": engine, "forwarder": forwarder, "recorder": recorder, "keys": keys, "prices": prices}
        finally:
            # Starlette runs this after the server has stopped taking requests and in-flight ones have
            # ended, so every record is already queued: drain them, then release the rest.
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await recorder.close()
            await alerts.close()
            await upstream.aclose()
            engine.dispose()

    return Starlette(
        routes=[Route("/healthz", healthz), *admin_routes(settings.admin_token), Mount("/v1", app=_forward)],
        lifespan=lifespan,
    )


async def _release_expired_holds(engine: Engine, interval: float) -> None:
    async def release() -> None:
        released = await anyio.to_thread.run_sync(release_expired, engine, datetime.now(UTC))
        if released:
            logger.warning("released the budget holds of %d calls that never settled", released)

    await _every(interval, release)


async def _every(interval: float, work: Callable[[], Awaitable[object]]) -> None:
    """Run background work every `interval` seconds until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except Exception:
            logger.exception("background task failed; will try again in %.0f s", interval)


async def _forward(scope: Scope, receive: Receive, send: Send) -> None:
    forwarder: Forwarder = scope["state"]["forwarder"]
    await forwarder(scope, receive, send)


async def healthz(request: Request) -> JSONResponse:
    """200 when the ledger answers; 503 otherwise."""
    engine: Engine = request.state.engine
    try:
        await anyio.to_thread.run_sync(_ping, engine)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "error": str(exc.__class__.__name__)}, status_code=503)
    return JSONResponse({"status": "ok", "pending_records": request.state.recorder.pending})


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
