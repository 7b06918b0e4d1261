"""A person's own page, "My spend": their calls and spend in each of their teams against their allowance, and their
personal keys, which they create, rotate and revoke here. A key is shown once, on the page that made it.

Every call made with a personal key is the key owner's (`user` is `oidc:<sub>`), so their allowance in a team with
`--user-budget` is theirs whatever the client sends.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from proxy.identity.roles import Principal
from proxy.ledger.key_admin import PERSONAL_KEY_DAYS, KeyView, create_key, list_keys, revoke_key, rotate_key
from proxy.ledger.keys import KeyCache
from proxy.ledger.teams import NotFound
from proxy.surfaces.dashboard.views import my_spend

# A key made from the dashboard lives at most this long: a person renews theirs, an admin makes longer ones.
MAX_PERSONAL_DAYS = 365
Render = Callable[..., str]


def me_routes(signed_in: Callable[..., Any], render: Render, clock: Callable[[], datetime]) -> list[Route]:
    """`/dashboard/me` and the forms that manage the signed-in person's keys."""

    def person(principal: Principal) -> str:
        if not principal.is_person:
            raise NotFound("The admin token is nobody: sign in as yourself to see your spend and keys.")
        return principal.actor

    async def page(request: Request, principal: Principal, *, made: tuple[KeyView, str] | None = None) -> Response:
        subject, now = person(principal), clock()
        engine: Engine = request.state.engine

        def read() -> tuple[list[Any], list[KeyView]]:
            keys = list_keys(engine, owner=subject)
            teams = sorted({*principal.teams, *(key.team for key in keys if key.revoked_at is None)})
            return my_spend(engine, subject, tuple(teams), now), keys

        spend, keys = await anyio.to_thread.run_sync(read)
        html = render(
            "me.html", me=principal, spend=spend, keys=keys, made=made, now=now, default_days=PERSONAL_KEY_DAYS
        )
        return HTMLResponse(html, status_code=201 if made else 200)

    async def show(request: Request, principal: Principal) -> Response:
        return await page(request, principal)

    async def create(request: Request, principal: Principal) -> Response:
        subject, form = person(principal), request.state.form
        team = form.get("team", "")
        if team not in principal.teams:
            raise NotFound(f"You are not a member of a team named {team!r}.")
        days = key_days(form.get("days", ""))
        name = form.get("name", "").strip()[:200] or None
        engine: Engine = request.state.engine
        made = await anyio.to_thread.run_sync(
            lambda: create_key(engine, team, actor=subject, name=name, owner=subject, expires_days=days)
        )
        return await page(request, principal, made=made)

    async def rotate(request: Request, principal: Principal) -> Response:
        subject, key_id = person(principal), request.path_params["key_id"]
        engine: Engine = request.state.engine
        made = await anyio.to_thread.run_sync(lambda: rotate_key(engine, key_id, actor=subject, owner=subject))
        _forget(request, key_id)
        return await page(request, principal, made=made)

    async def revoke(request: Request, principal: Principal) -> Response:
        subject, key_id = person(principal), request.path_params["key_id"]
        engine: Engine = request.state.engine
        await anyio.to_thread.run_sync(lambda: revoke_key(engine, key_id, actor=subject, owner=subject))
        _forget(request, key_id)
        return await page(request, principal)

    return [
        Route("/dashboard/me", signed_in(show), methods=["GET"]),
        Route("/dashboard/me/keys", signed_in(create), methods=["POST"]),
        Route("/dashboard/me/keys/{key_id}/rotate", signed_in(rotate), methods=["POST"]),
        Route("/dashboard/me/keys/{key_id}/revoke", signed_in(revoke), methods=["POST"]),
    ]


def _forget(request: Request, key_id: str) -> None:
    """This replica refuses the old key at once; the others within their key-cache lifetime."""
    keys: KeyCache = request.state.keys
    keys.forget(key_id)


def key_days(raw: str) -> int:
    """A key's lifetime from the form: 1 to `MAX_PERSONAL_DAYS` days (anything else: the default)."""
    # isascii: "²" is a digit to str.isdigit, not to int().
    return int(raw) if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PERSONAL_DAYS else PERSONAL_KEY_DAYS
