"""The admin HTTP API: the CLI's operations over JSON, behind `Authorization: Bearer $SPENDGATE_ADMIN_TOKEN`.

Without an admin token configured, every `/admin` path answers 404: the API does not exist.
Errors use Anthropic's error shape, like every other answer spendgate makes itself.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from http import HTTPStatus
from importlib.metadata import version
from typing import Any

import anyio.to_thread
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import ProxyError, error_response, ledger_errors
from proxy.gateway.gate import receive_body
from proxy.gateway.validate import parse_object
from proxy.ledger.export import Cursor, iter_usage
from proxy.ledger.keys import KeyCache
from proxy.ledger.reports import report
from proxy.ledger.teams import (
    UNSET,
    Conflict,
    NotFound,
    TeamSettings,
    create_key,
    create_team,
    get_team,
    list_keys,
    list_teams,
    list_users,
    revoke_key,
    set_user_budget,
    update_key,
    update_team,
)
from proxy.pricing.table import PriceTable
from proxy.surfaces.admin_models import (
    Document,
    Error,
    Key as KeyOut,
    KeyCreate,
    KeyCreated,
    Keys,
    KeyUpdate,
    Report,
    ReportQuery,
    Team as TeamOut,
    TeamCreate,
    TeamFields,
    Teams,
    UsagePage,
    UsageQuery,
    User as UserOut,
    UserBudgetSet,
    UserQuery,
    Users,
    explain,
)
from proxy.types import RateLimits, parse_instant

Handler = Callable[[Request], Awaitable[Response]]
JSON = "application/json"
# Every admin body is a handful of fields (the largest, a team with its model list, a few KB).
MAX_BODY_BYTES = 1024 * 1024


class AdminError(Exception):
    """An admin request we refuse; rendered in Anthropic's error shape."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One admin route: what it does, what it takes and answers (the OpenAPI document is made from these)."""

    method: str
    path: str
    handler: Handler
    summary: str
    answer: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    # Refusals besides 401 (every route), 413 (every route with a body) and 503 (the ledger did not answer).
    errors: tuple[int, ...] = ()


def admin_routes(token: str | None) -> list[Route]:
    """The `/admin` routes, each checking the bearer token (or answering 404 when there is none)."""

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                _authorize(request, token)
                return await handler(request)
            except AdminError as error:
                return error_response(error.status, error.error_type, error.message)
            except ProxyError as error:
                return error.response()
            except NotFound as error:
                return error_response(404, "not_found_error", str(error))
            except Conflict as error:
                return error_response(409, "invalid_request_error", str(error))
            except ValidationError as error:
                return error_response(400, "invalid_request_error", explain(error))
            except ValueError as error:
                return error_response(400, "invalid_request_error", str(error))

        return endpoint

    routes = [Route(op.path, guarded(op.handler), methods=[op.method]) for op in OPERATIONS]
    return [*routes, Route("/admin/openapi.json", guarded(_openapi), methods=["GET"])]


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
    body = TeamCreate.model_validate(await _json(request))
    fields = body.given()
    fields.pop("name", None)
    settings = TeamSettings(**fields)
    view = await _run(request, lambda engine: create_team(engine, body.name, settings, actor=_actor(request)))
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
    settings = TeamSettings(**TeamFields.model_validate(await _json(request)).given())
    view = await _run(request, lambda engine: update_team(engine, name, settings, actor=_actor(request)))
    return JSONResponse(view.to_json())


async def _create_key(request: Request) -> Response:
    team = request.path_params["name"]
    body = KeyCreate.model_validate(await _json(request))
    view, key = await _run(
        request,
        lambda engine: create_key(
            engine,
            team,
            actor=_actor(request),
            name=body.name,
            budget_usd=body.budget_usd,
            period=body.period,
            rates=RateLimits(rpm=body.rpm, itpm=body.itpm, otpm=body.otpm),
        ),
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


async def _update_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    changes = KeyUpdate.model_validate(await _json(request)).given()
    view = await _run(request, lambda engine: update_key(engine, key_id, actor=_actor(request), **changes))
    keys: KeyCache = request.state.keys
    keys.forget(key_id)
    return JSONResponse(view.to_json())


async def _list_users(request: Request) -> Response:
    team = request.path_params["name"]
    views = await _run(request, lambda engine: list_users(engine, team))
    return JSONResponse({"data": [view.to_json() for view in views]})


async def _set_user_budget(request: Request) -> Response:
    team = request.path_params["name"]
    body = UserBudgetSet.model_validate(await _json(request))
    view = await _run(
        request, lambda engine: set_user_budget(engine, team, body.user, body.budget_usd, actor=_actor(request))
    )
    return JSONResponse(view.to_json())


async def _clear_user_budget(request: Request) -> Response:
    team = request.path_params["name"]
    query = UserQuery.model_validate(dict(request.query_params))
    view = await _run(request, lambda engine: set_user_budget(engine, team, query.user, UNSET, actor=_actor(request)))
    return JSONResponse(view.to_json())


async def _usage(request: Request) -> Response:
    query = UsageQuery.model_validate(dict(request.query_params))
    limit, team = query.limit, query.team
    after = _decode_cursor(query.cursor) if query.cursor is not None else None
    since, until = _instant(query.since, "since"), _instant(query.until, "until")

    def page(engine: Engine) -> list[tuple[Cursor, dict[str, Any]]]:
        return list(iter_usage(engine, team=team, since=since, until=until, after=after, limit=limit + 1))

    rows = await _run(request, page)
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1][0]) if has_more else None
    return JSONResponse({"data": [record for _, record in rows], "has_more": has_more, "next_cursor": next_cursor})


async def _report(request: Request) -> Response:
    query = ReportQuery.model_validate(dict(request.query_params))
    by = query.groups()
    since, until = _instant(query.since, "since"), _instant(query.until, "until")
    prices: PriceTable = request.state.prices
    rows = await _run(request, lambda engine: report(engine, prices, by=by, since=since, until=until))
    return JSONResponse({"data": [row.to_json() for row in rows]})


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


OPERATIONS = (
    Operation(
        method="POST",
        path="/admin/teams",
        handler=_create_team,
        summary="Create a team",
        body=TeamCreate,
        answer=TeamOut,
        status=201,
        errors=(400, 409),
    ),
    Operation(
        method="GET", path="/admin/teams", handler=_list_teams, summary="List teams with their spend", answer=Teams
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}",
        handler=_get_team,
        summary="One team with its spend",
        answer=TeamOut,
        errors=(404,),
    ),
    Operation(
        method="PATCH",
        path="/admin/teams/{name}",
        handler=_update_team,
        summary="Change a team's rules",
        body=TeamFields,
        answer=TeamOut,
        errors=(400, 404),
    ),
    Operation(
        method="POST",
        path="/admin/teams/{name}/keys",
        handler=_create_key,
        summary="Create a client key",
        body=KeyCreate,
        answer=KeyCreated,
        status=201,
        errors=(400, 404),
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}/keys",
        handler=_list_keys,
        summary="List a team's keys",
        answer=Keys,
        errors=(404,),
    ),
    Operation(
        method="DELETE",
        path="/admin/keys/{key_id}",
        handler=_revoke_key,
        summary="Revoke a key",
        answer=KeyOut,
        errors=(404,),
    ),
    Operation(
        method="PATCH",
        path="/admin/keys/{key_id}",
        handler=_update_key,
        summary="Change a key's rate limits",
        body=KeyUpdate,
        answer=KeyOut,
        errors=(400, 404),
    ),
    Operation(
        method="GET",
        path="/admin/teams/{name}/users",
        handler=_list_users,
        summary="A team's end users this period, against their allowance",
        answer=Users,
        errors=(404,),
    ),
    Operation(
        method="PUT",
        path="/admin/teams/{name}/user-budgets",
        handler=_set_user_budget,
        summary="Give one end user their own budget",
        body=UserBudgetSet,
        answer=UserOut,
        errors=(400, 404),
    ),
    Operation(
        method="DELETE",
        path="/admin/teams/{name}/user-budgets",
        handler=_clear_user_budget,
        summary="End a user's own budget (the team's per-user budget applies again)",
        query=UserQuery,
        answer=UserOut,
        errors=(400, 404),
    ),
    Operation(
        method="GET",
        path="/admin/usage",
        handler=_usage,
        summary="Usage records, oldest first, in pages",
        query=UsageQuery,
        answer=UsagePage,
        errors=(400,),
    ),
    Operation(
        method="GET",
        path="/admin/report",
        handler=_report,
        summary="Spend totals by group",
        query=ReportQuery,
        answer=Report,
        errors=(400,),
    ),
    Operation(method="GET", path="/admin/openapi.json", handler=_openapi, summary="This document", answer=Document),
)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The admin API as OpenAPI 3.1, made from the models that validate its requests and shape its answers."""
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for op in OPERATIONS:
        pairs.append((op.answer, "serialization"))
        if op.body is not None:
            pairs.append((op.body, "validation"))
    refs, top = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        answer = refs[(op.answer, "serialization")]
        responses = {str(op.status): {"description": op.summary, "content": {JSON: {"schema": answer}}}}
        too_large = (413,) if op.body is not None else ()
        for status in (*op.errors, *too_large, 401, 503):
            error = refs[(Error, "serialization")]
            responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": {JSON: {"schema": error}}}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", op.path)
        ]
        if op.query is not None:
            properties = op.query.model_json_schema()["properties"]
            parameters += [
                {"name": name, "in": "query", "required": False, "schema": schema, "description": field.description}
                for name, field in op.query.model_fields.items()
                for schema in [properties[name]]
            ]
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.handler.__name__.strip("_"),
            "parameters": parameters,
            "responses": responses,
        }
        if op.body is not None:
            schema = refs[(op.body, "validation")]
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "spendgate admin API",
            "version": version("spendgate"),
            "description": "The CLI's operations over JSON. Errors use Anthropic's error shape.",
        },
        "security": [{"admin": []}],
        "paths": paths,
        "components": {
            "schemas": top["$defs"],
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer", "description": "SPENDGATE_ADMIN_TOKEN"}},
        },
    }


async def _run(request: Request, work: Callable[[Engine], Any]) -> Any:
    engine: Engine = request.state.engine
    with ledger_errors():
        return await anyio.to_thread.run_sync(work, engine)


async def _json(request: Request) -> dict[str, Any]:
    content_length = request.headers.get("content-length")
    body = await receive_body(request.receive, MAX_BODY_BYTES, content_length=content_length)
    # Money arrives as JSON numbers too: parse them as exact decimals, never floats.
    return parse_object(body, "the request's fields", parse_float=Decimal)


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
