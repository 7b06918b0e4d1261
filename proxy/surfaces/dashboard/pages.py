"""The dashboard's routes: the overview, a team's page, its usage as CSV, the ledger's health, "My spend", the
device page; sign-in is proxy/surfaces/dashboard/signin.py.

Every page but sign-in wants a session (proxy/surfaces/sessions.py) and shows only what its principal may see
(proxy/identity/roles.py): a person sees their teams and their own spend, an admin everything. With neither the
admin token nor an identity provider configured, the dashboard does not exist (404), like the admin API. Pages are
rendered on the server from Jinja2 templates and load nothing from anywhere else (a Content-Security-Policy says so
to the browser). Every change is a POST carrying the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
import jinja2
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from proxy.errors import error_response, ledger_errors
from proxy.identity.oidc import OidcClient
from proxy.identity.roles import Principal
from proxy.ledger.audit import Verdict, verify
from proxy.ledger.export import csv_chunks, iter_usage
from proxy.ledger.teams import NotFound, get_team
from proxy.pricing.table import PriceTable
from proxy.surfaces.dashboard.charts import money
from proxy.surfaces.dashboard.device import device_routes
from proxy.surfaces.dashboard.me import me_routes
from proxy.surfaces.dashboard.signin import sign_in_routes
from proxy.surfaces.dashboard.views import ledger_page, outlooks, team_page
from proxy.surfaces.sessions import Access, csrf_matches, read_form
from proxy.types import parse_instant

Clock = Callable[[], datetime]
Page = Callable[[Request, Principal], Awaitable[Response]]
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
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
    access: Access | None, oidc: OidcClient | None, *, spill_dir: Path, clock: Clock
) -> list[BaseRoute]:
    """The `/dashboard` routes and the device page (all 404 with no way to sign in)."""
    if access is None:

        async def absent(request: Request) -> Response:
            return error_response(
                404,
                "not_found_error",
                "Not found. The dashboard is off: set SPENDGATE_ADMIN_TOKEN or SPENDGATE_OIDC_ISSUER.",
            )

        return [
            Route(path, absent, methods=["GET", "POST"]) for path in ("/dashboard", "/dashboard/{rest:path}", "/device")
        ]
    last = LastVerify()

    def signed_in(page: Page, *, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                with ledger_errors():
                    principal = await access.principal(request)
                    if principal is None:
                        return _secure(RedirectResponse(_sign_in_for(request), status_code=303))
                    if admin and not principal.is_admin:
                        raise NotFound("Not found.")
                    if request.method == "POST":
                        request.state.form = await read_form(request)
                        if not csrf_matches(principal, request.state.form.get("csrf")):
                            message = "This form is stale or came from another site. Reload the page and try again."
                            return _secure(
                                HTMLResponse(render("problem.html", title="Forbidden", message=message), 403)
                            )
                    return _secure(await page(request, principal))
            except NotFound as error:
                return _secure(HTMLResponse(render("problem.html", title="Not found", message=str(error)), 404))

        return guarded

    async def overview(request: Request, principal: Principal) -> Response:
        now = clock()
        teams = await _ledger(request, lambda engine, prices: outlooks(engine, prices, now))
        teams = [outlook for outlook in teams if principal.may_see(outlook.team.name)]
        return HTMLResponse(render("overview.html", teams=teams, now=now, me=principal))

    def visible(principal: Principal, name: str) -> str:
        # Another team's page does not exist for a person: the same 404 as a team that does not exist.
        if not principal.may_see(name):
            raise NotFound(f"no team named {name!r}")
        return name

    async def team(request: Request, principal: Principal) -> Response:
        name, now = visible(principal, request.path_params["name"]), clock()
        page = await _ledger(request, lambda engine, prices: team_page(engine, prices, name, now))
        return HTMLResponse(render("team.html", page=page, outlook=page.outlook, now=now, me=principal))

    async def usage_csv(request: Request, principal: Principal) -> Response:
        name = visible(principal, request.path_params["name"])
        try:
            since, until = (_instant(request.query_params.get(bound)) for bound in ("since", "until"))
        except ValueError as error:
            return HTMLResponse(render("problem.html", title="Bad request", message=str(error), me=principal), 400)
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

    async def ledger(request: Request, principal: Principal) -> Response:
        page = await _ledger(request, lambda engine, prices: ledger_page(engine, spill_dir))
        pending = request.state.writer.pending
        return HTMLResponse(render("ledger.html", page=page, pending=pending, last=last, now=clock(), me=principal))

    async def run_verify(request: Request, principal: Principal) -> Response:
        last.verdict = await _ledger(request, lambda engine, prices: verify(engine))
        last.at = clock()
        return RedirectResponse("/dashboard/ledger", status_code=303)

    return [
        *(_headed(route) for route in sign_in_routes(access, oidc, render)),
        Route("/dashboard", signed_in(overview), methods=["GET"]),
        Route("/dashboard/teams/{name}", signed_in(team), methods=["GET"]),
        Route("/dashboard/teams/{name}/usage.csv", signed_in(usage_csv), methods=["GET"]),
        Route("/dashboard/ledger", signed_in(ledger, admin=True), methods=["GET"]),
        Route("/dashboard/ledger/verify", signed_in(run_verify, admin=True), methods=["POST"]),
        *me_routes(signed_in, render, clock),
        *device_routes(signed_in, render),
        Mount("/dashboard/static", StaticFiles(packages=[("proxy.surfaces.dashboard", "static")])),
    ]


def render(template: str, **context: Any) -> str:
    """A dashboard template filled in."""
    return _templates.get_template(template).render(**context)


def _sign_in_for(request: Request) -> str:
    """The sign-in page, which sends the browser back here afterwards."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/dashboard/sign-in" if here == "/dashboard" else f"/dashboard/sign-in?next={quote(here)}"


def _headed(route: Route) -> Route:
    """`route` with the security headers on its answers."""
    endpoint = route.endpoint

    async def headed(request: Request) -> Response:
        return _secure(await endpoint(request))

    return Route(route.path, headed, methods=list(route.methods or ()))


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


async def _ledger(request: Request, work: Callable[[Engine, PriceTable], Any]) -> Any:
    return await anyio.to_thread.run_sync(work, request.state.engine, request.state.prices)


def _instant(raw: str | None) -> datetime | None:
    return None if not raw else parse_instant(raw).astimezone(UTC)


async def _threaded(chunks: Iterator[str]) -> Any:
    """Iterate a blocking generator in a thread, chunk by chunk, so the event loop never waits on the ledger."""
    done = object()
    while (chunk := await anyio.to_thread.run_sync(next, chunks, done)) is not done:
        yield chunk
