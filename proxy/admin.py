"""The admin HTTP API: the CLI's operations over JSON, behind `Authorization: Bearer $SPENDGATE_ADMIN_TOKEN`.

Without an admin token configured, every `/admin` path answers 404: the API does not exist.
Errors use Anthropic's error shape, like every other answer spendgate makes itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import ProxyError, ledger_errors
from proxy.export import Cursor, iter_usage
from proxy.keys import KeyCache
from proxy.pricing import PriceTable
from proxy.reports import report
from proxy.teams import (
    UNSET,
    Conflict,
    NotFound,
    TeamSettings,
    create_key,
    create_team,
    get_team,
    list_keys,
    list_teams,
    revoke_key,
    update_team,
)
from proxy.types import parse_instant

DEFAULT_PAGE = 100
MAX_PAGE = 1000
TEAM_FIELDS = ("budget_usd", "period", "max_output_tokens", "cap_policy", "models", "retry_window_seconds")
Handler = Callable[[Request], Awaitable[Response]]


class AdminError(Exception):
    """An admin request we refuse; rendered in Anthropic's error shape."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def admin_routes(token: str | None) -> list[Route]:
    """The `/admin` routes, each checking the bearer token (or answering 404 when there is none)."""

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                _authorize(request, token)
                return await handler(request)
            except AdminError as error:
                return _error(error.status, error.error_type, error.message)
            except ProxyError as error:
                return error.response()
            except NotFound as error:
                return _error(404, "not_found_error", str(error))
            except Conflict as error:
                return _error(409, "invalid_request_error", str(error))
            except ValueError as error:
                return _error(400, "invalid_request_error", str(error))

        return endpoint

    return [
        Route("/admin/teams", guarded(_create_team), methods=["POST"]),
        Route("/admin/teams", guarded(_list_teams), methods=["GET"]),
        Route("/admin/teams/{name}", guarded(_get_team), methods=["GET"]),
        Route("/admin/teams/{name}", guarded(_update_team), methods=["PATCH"]),
        Route("/admin/teams/{name}/keys", guarded(_create_key), methods=["POST"]),
        Route("/admin/teams/{name}/keys", guarded(_list_keys), methods=["GET"]),
        Route("/admin/keys/{key_id}", guarded(_revoke_key), methods=["DELETE"]),
        Route("/admin/usage", guarded(_usage), methods=["GET"]),
        Route("/admin/report", guarded(_report), methods=["GET"]),
    ]


def _actor(request: Request) -> str:
    """The admin token's identity in the audit trail: a digest of the token, never the token."""
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    return "admin:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise AdminError(404, "not_found_error", "Not found. The admin API is off: set SPENDGATE_ADMIN_TOKEN.")
    given = request.headers.get("authorization", "")
    scheme, _, credential = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(credential.strip().encode(), token.encode()):
        raise AdminError(401, "authentication_error", "Send 'Authorization: Bearer <SPENDGATE_ADMIN_TOKEN>'.")


async def _create_team(request: Request) -> Response:
    body = await _json(request)
    name = body.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("'name' (a string) is required")
    settings = _team_settings(body)
    view = await _run(request, lambda engine: create_team(engine, name, settings, actor=_actor(request)))
    return JSONResponse(view.to_json(), status_code=201)


async def _list_teams(request: Request) -> Response:
    views = await _run(request, list_teams)
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _get_team(request: Request) -> Response:
    name = request.path_params["name"]
    view = await _run(request, lambda engine: get_team(engine, name))
    return JSONResponse(view.to_json())


async def _update_team(request: Request) -> Response:
    name = request.path_params["name"]
    settings = _team_settings(await _json(request))
    view = await _run(request, lambda engine: update_team(engine, name, settings, actor=_actor(request)))
    return JSONResponse(view.to_json())


async def _create_key(request: Request) -> Response:
    team = request.path_params["name"]
    body = await _json(request)
    unknown = set(body) - {"name", "budget_usd", "period"}
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    label = body.get("name")
    budget = _decimal(body.get("budget_usd"), "budget_usd")
    period = body.get("period", "month")
    view, key = await _run(
        request,
        lambda engine: create_key(engine, team, actor=_actor(request), name=label, budget_usd=budget, period=period),
    )
    return JSONResponse({**view.to_json(), "key": key}, status_code=201)


async def _list_keys(request: Request) -> Response:
    team = request.path_params["name"]
    await _run(request, lambda engine: get_team(engine, team))
    views = await _run(request, lambda engine: list_keys(engine, team=team))
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    view = await _run(request, lambda engine: revoke_key(engine, key_id, actor=_actor(request)))
    keys: KeyCache = request.state.keys
    # This replica refuses the key at once; the others within their key-cache lifetime.
    keys.forget(key_id)
    return JSONResponse(view.to_json())


async def _usage(request: Request) -> Response:
    query = request.query_params
    limit = _page_size(query.get("limit"))
    after = _decode_cursor(query["cursor"]) if "cursor" in query else None
    since, until = _instant(query.get("since"), "since"), _instant(query.get("until"), "until")
    team = query.get("team")

    def page(engine: Engine) -> list[tuple[Cursor, dict[str, Any]]]:
        return list(iter_usage(engine, team=team, since=since, until=until, after=after, limit=limit + 1))

    rows = await _run(request, page)
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1][0]) if has_more else None
    return JSONResponse({"data": [record for _, record in rows], "has_more": has_more, "next_cursor": next_cursor})


async def _report(request: Request) -> Response:
    query = request.query_params
    by = [name.strip() for name in query.get("by", "").split(",") if name.strip()]
    since, until = _instant(query.get("since"), "since"), _instant(query.get("until"), "until")
    prices: PriceTable = request.state.prices
    rows = await _run(request, lambda engine: report(engine, prices, by=by, since=since, until=until))
    return JSONResponse({"data": [row.to_json() for row in rows]})


async def _run(request: Request, work: Callable[[Engine], Any]) -> Any:
    engine: Engine = request.state.engine
    with ledger_errors():
        return await anyio.to_thread.run_sync(work, engine)


async def _json(request: Request) -> dict[str, Any]:
    try:
        # Money arrives as JSON numbers too: parse them as exact decimals, never floats.
        body = json.loads(await request.body(), parse_float=Decimal)
    except ValueError:
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _team_settings(body: dict[str, Any]) -> TeamSettings:
    """Fields present are set (null clears a limit); fields absent are left as they are."""
    unknown = set(body) - set(TEAM_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    models = body.get("models", UNSET)
    if models is not None and models is not UNSET:
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError("'models' must be a non-empty list of model ids, or null for every model")
        models = tuple(models)
    tokens = body.get("max_output_tokens", UNSET)
    if tokens is not None and tokens is not UNSET and (not isinstance(tokens, int) or isinstance(tokens, bool)):
        raise ValueError("'max_output_tokens' must be a whole number, or null for no cap")
    window = body.get("retry_window_seconds", UNSET)
    if window is not UNSET and (not isinstance(window, int) or isinstance(window, bool)):
        raise ValueError("'retry_window_seconds' must be a whole number of seconds (0: off)")
    return TeamSettings(
        retry_window_seconds=window,
        budget_usd=_decimal(body["budget_usd"], "budget_usd") if "budget_usd" in body else UNSET,
        period=body.get("period", UNSET),
        max_output_tokens=tokens,
        cap_policy=body.get("cap_policy", UNSET),
        models=models,
    )


def _decimal(value: Any, field: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise ValueError(f"'{field}' must be an amount in USD, e.g. \"250.00\"")
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise ValueError(f"'{field}' must be an amount in USD, e.g. \"250.00\"") from None
    if not amount.is_finite():
        raise ValueError(f"'{field}' must be an amount in USD, e.g. \"250.00\"")
    return amount


def _page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise ValueError(f"'limit' must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)


def _instant(raw: str | None, field: str) -> datetime | None:
    try:
        return None if raw is None else parse_instant(raw)
    except ValueError as error:
        raise ValueError(f"'{field}': {error}") from None


def _encode_cursor(cursor: Cursor) -> str:
    started_at, seq = cursor
    return base64.urlsafe_b64encode(f"{started_at.isoformat()}|{seq}".encode()).decode()


def _decode_cursor(raw: str) -> Cursor:
    try:
        started_at, _, seq = base64.urlsafe_b64decode(raw.encode()).decode().partition("|")
        return datetime.fromisoformat(started_at), int(seq)
    except ValueError:
        raise ValueError("'cursor' is not one this API returned") from None


def _error(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": error_type, "message": message}}, status_code=status)
