"""The `/device` page (RFC 8628 section 3.3): a signed-in person types the code their terminal shows and approves
it for one of their teams, or denies it. Tries are rate limited per person, so a signed-in person cannot sweep
the code space for someone else's waiting terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.identity.roles import Principal
from proxy.ledger.device_grants import PendingGrant, decide, normalize_user_code, pending
from proxy.ledger.key_admin import PERSONAL_KEY_DAYS
from proxy.ledger.teams import NotFound
from proxy.surfaces.dashboard.me import key_days
from proxy.surfaces.dashboard.signin import SignInLimiter

Render = Callable[..., str]


def device_routes(signed_in: Callable[..., Any], render: Render) -> list[Route]:
    """`GET /device` (the form) and `POST /device` (the decision)."""
    # Every decision takes a try, right code or wrong: a person needs one or two, a sweep of the codes millions.
    attempts = SignInLimiter()

    def form(
        principal: Principal,
        code: str,
        *,
        error: str | None = None,
        status: int = 200,
        asked: PendingGrant | None = None,
    ) -> Response:
        if not principal.is_person:
            raise NotFound("The admin token is nobody: sign in as yourself to approve a device.")
        html = render(
            "device.html",
            me=principal,
            code=code,
            error=error,
            done=None,
            days=PERSONAL_KEY_DAYS,
            teams=principal.teams,
            asked=asked,
        )
        return HTMLResponse(html, status_code=status)

    async def show(request: Request, principal: Principal) -> Response:
        code = normalize_user_code(request.query_params.get("user_code", "")) or ""
        engine: Engine = request.state.engine
        # Who asked, shown beside the code: a link someone else sent is a request from their terminal, not yours.
        asked = await anyio.to_thread.run_sync(pending, engine, code) if code else None
        return form(principal, code, asked=asked)

    async def answer(request: Request, principal: Principal) -> Response:
        fields = request.state.form
        typed = fields.get("user_code", "")
        wait = attempts.attempt(principal.actor, time.monotonic())
        if wait:
            return form(principal, typed, error=f"Too many tries. Try again in {wait:.0f} seconds.", status=429)
        code = normalize_user_code(typed)
        approve = fields.get("decision") == "approve"
        team = fields.get("team", "")
        if approve and team not in principal.teams:
            return form(principal, typed, error="Pick one of your teams.", status=400)
        name = fields.get("name", "").strip()[:200] or "spendgate login"
        days = key_days(fields.get("days", ""))
        engine: Engine = request.state.engine

        def decided() -> bool:
            return code is not None and decide(
                engine, code, subject=principal.actor, approve=approve, team=team, key_name=name, key_days=days
            )

        if not await anyio.to_thread.run_sync(decided):
            return form(
                principal, typed, error="No sign-in is waiting with that code. Check it and try again.", status=400
            )
        html = render("device.html", me=principal, done="approved" if approve else "denied", code=code, error=None)
        return HTMLResponse(html)

    return [
        Route("/device", signed_in(show), methods=["GET"]),
        Route("/device", signed_in(answer), methods=["POST"]),
    ]
