"""The dashboard's routes: sign-in, the overview, a team's page, its usage as CSV, and the ledger's health.

Every page but the sign-in form wants a valid session cookie (`proxy/surfaces/dashboard/session.py`); without the admin
token configured, the dashboard does not exist (404), like the admin API. Pages are rendered on the server
from Jinja2 templates and load nothing from anywhere else (a Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio.to_thread
import jinja2
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from proxy.errors import error_response, ledger_errors
from proxy.ledger.audit import Verdict, verify
from proxy.ledger.export import csv_chunks, iter_usage
from proxy.ledger.teams import NotFound, get_team
from proxy.pricing.table import PriceTable
from proxy.surfaces.dashboard.charts import money
from proxy.surfaces.dashboard.session import COOKIE, SESSION_SECONDS, Sessions, SignInLimiter
from proxy.surfaces.dashboard.views import ledger_page, outlooks, team_page
from proxy.types import parse_instant

Clock = Callable[[], datetime]
Page = Callable[[Request], Awaitable[Response]]
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
MAX_FORM_BYTES = 4096
_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("proxy.surfaces.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_templates.filters["usd"] = money


@dataclass(slots=True)
class LastVerify:
    """The last audit verification run from the dashboard by this process."""

    verdict: Verdict | None = None
    at: datetime | None = None


def dashboard_routes(
    admin_token: str | None, *, spill_dir: Path, clock: Clock, public_url: str | None = None
) -> list[BaseRoute]:
    """The `/dashboard` routes (all 404 without an admin token)."""
    if admin_token is None:

        async def absent(request: Request) -> Response:
            return error_response(404, "not_found_error", "Not found. The dashboard is off: set SPENDGATE_ADMIN_TOKEN.")

        return [Route("/dashboard", absent), Route("/dashboard/{rest:path}", absent, methods=["GET", "POST"])]
    sessions = Sessions(admin_token)
    limiter = SignInLimiter()
    last = LastVerify()

    def signed_in(page: Page) -> Page:
        async def guarded(request: Request) -> Response:
            if not sessions.valid(request.cookies.get(COOKIE), time.time()):
                return _secure(RedirectResponse("/dashboard/sign-in", status_code=303))
            try:
                with ledger_errors():
                    return _secure(await page(request))
            except NotFound as error:
                return _secure(HTMLResponse(render("problem.html", title="Not found", message=str(error)), 404))

        return guarded

    async def sign_in_form(request: Request) -> Response:
        return _secure(HTMLResponse(render("sign_in.html", error=None)))

    async def sign_in(request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        wait = limiter.attempt(client, time.monotonic())
        if wait:
            page = render("sign_in.html", error=f"Too many attempts. Try again in {wait:.0f} seconds.")
            return _secure(HTMLResponse(page, status_code=429, headers={"retry-after": str(int(wait) + 1)}))
        body = await _bounded_body(request)
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not sessions.token_matches(token):
            return _secure(HTMLResponse(render("sign_in.html", error="That is not the admin token."), status_code=401))
        answer = RedirectResponse("/dashboard", status_code=303)
        answer.set_cookie(
            COOKIE,
            sessions.issue(time.time()),
            max_age=SESSION_SECONDS,
            path="/dashboard",
            # Behind a TLS-terminating proxy the request itself is http: SPENDGATE_PUBLIC_URL says https.
            secure=request.url.scheme == "https" or (public_url or "").startswith("https://"),
            httponly=True,
            samesite="strict",
        )
        return _secure(answer)

    async def sign_out(request: Request) -> Response:
        answer = RedirectResponse("/dashboard/sign-in", status_code=303)
        answer.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
        return _secure(answer)

    async def overview(request: Request) -> Response:
        now = clock()
        teams = await _ledger(request, lambda engine, prices: outlooks(engine, prices, now))
        return HTMLResponse(render("overview.html", teams=teams, now=now))

    async def team(request: Request) -> Response:
        name, now = request.path_params["name"], clock()
        page = await _ledger(request, lambda engine, prices: team_page(engine, prices, name, now))
        return HTMLResponse(render("team.html", page=page, outlook=page.outlook, now=now))

    async def usage_csv(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            since, until = (_instant(request.query_params.get(bound)) for bound in ("since", "until"))
        except ValueError as error:
            return HTMLResponse(render("problem.html", title="Bad request", message=str(error)), 400)
        engine: Engine = request.state.engine
        await _ledger(request, lambda engine, prices: get_team(engine, name))  # NotFound: a 404, before any byte
        records = (record for _, record in iter_usage(engine, team=name, since=since, until=until))
        chunks = (chunk for chunk, _ in csv_chunks(records))
        filename = f"spendgate-{name}-usage.csv"
        return StreamingResponse(
            _threaded(chunks),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    async def ledger(request: Request) -> Response:
        page = await _ledger(request, lambda engine, prices: ledger_page(engine, spill_dir))
        pending = request.state.writer.pending
        return HTMLResponse(render("ledger.html", page=page, pending=pending, last=last, now=clock()))

    async def run_verify(request: Request) -> Response:
        last.verdict = await _ledger(request, lambda engine, prices: verify(engine))
        last.at = clock()
        return RedirectResponse("/dashboard/ledger", status_code=303)

    return [
        Route("/dashboard/sign-in", sign_in_form, methods=["GET"]),
        Route("/dashboard/sign-in", sign_in, methods=["POST"]),
        Route("/dashboard/sign-out", signed_in(sign_out), methods=["POST"]),
        Route("/dashboard", signed_in(overview), methods=["GET"]),
        Route("/dashboard/teams/{name}", signed_in(team), methods=["GET"]),
        Route("/dashboard/teams/{name}/usage.csv", signed_in(usage_csv), methods=["GET"]),
        Route("/dashboard/ledger", signed_in(ledger), methods=["GET"]),
        Route("/dashboard/ledger/verify", signed_in(run_verify), methods=["POST"]),
        Mount("/dashboard/static", StaticFiles(packages=[("proxy.surfaces.dashboard", "static")])),
    ]


def render(template: str, **context: Any) -> str:
    """A dashboard template filled in."""
    return _templates.get_template(template).render(**context)


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


async def _ledger(request: Request, work: Callable[[Engine, PriceTable], Any]) -> Any:
    return await anyio.to_thread.run_sync(work, request.state.engine, request.state.prices)


async def _bounded_body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            break
    return body[:MAX_FORM_BYTES]


def _instant(raw: str | None) -> datetime | None:
    return None if not raw else parse_instant(raw).astimezone(UTC)


async def _threaded(chunks: Iterator[str]) -> Any:
    """Iterate a blocking generator in a thread, chunk by chunk, so the event loop never waits on the ledger."""
    done = object()
    while (chunk := await anyio.to_thread.run_sync(next, chunks, done)) is not done:
        yield chunk
