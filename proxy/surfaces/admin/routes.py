"""The `/admin` routes: every operation, behind the admin token or an admin's dashboard session, its refusals in
Anthropic's error shape.

A session (the dashboard's cookie) admits only admins, and a change made with it (any method but GET) must carry
the session's CSRF token in `x-spendgate-csrf`: a cookie rides along with requests other sites make, a header of
ours does not. Each change's audit event names who made it: `admin-token`, or the person (`oidc:<sub>`).
"""

from __future__ import annotations

import secrets

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.display import explain
from proxy.errors import ProxyError, error_response, ledger_errors
from proxy.ledger.teams import Conflict, NotFound
from proxy.ledger.web_sessions import ADMIN_TOKEN_ACTOR
from proxy.surfaces.admin.openapi import openapi_document
from proxy.surfaces.admin.requests import Handler, Operation
from proxy.surfaces.admin.teams import TEAM_OPERATIONS
from proxy.surfaces.admin.usage import USAGE_OPERATIONS
from proxy.surfaces.admin_models import Document
from proxy.surfaces.sessions import CSRF_HEADER, Access, csrf_matches


class AdminError(Exception):
    """An admin request we refuse; rendered in Anthropic's error shape."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def admin_routes(token: str | None, access: Access | None) -> list[Route]:
    """The `/admin` routes, each checking the bearer token or session (or answering 404 when neither can be)."""

    def guarded(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                with ledger_errors():
                    request.state.actor = await _authorize(request, token, access)
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

    return [Route(op.path, guarded(op.handler), methods=[op.method]) for op in OPERATIONS]


async def _authorize(request: Request, token: str | None, access: Access | None) -> str:
    """Who is asking (their audit name), or `AdminError`."""
    if access is None:
        raise AdminError(
            404,
            "not_found_error",
            "Not found. The admin API is off: set SPENDGATE_ADMIN_TOKEN or SPENDGATE_OIDC_ISSUER.",
        )
    given = request.headers.get("authorization", "")
    scheme, _, credential = given.partition(" ")
    if given:
        if (
            token is None
            or scheme.lower() != "bearer"
            or not secrets.compare_digest(credential.strip().encode("utf-8", "replace"), token.encode())
        ):
            raise AdminError(401, "authentication_error", "Send 'Authorization: Bearer <SPENDGATE_ADMIN_TOKEN>'.")
        return ADMIN_TOKEN_ACTOR
    principal = await access.principal(request)
    if principal is None:
        raise AdminError(
            401,
            "authentication_error",
            "Send 'Authorization: Bearer <SPENDGATE_ADMIN_TOKEN>', or sign in to the dashboard as an admin.",
        )
    if not principal.is_admin:
        raise AdminError(403, "permission_error", "Only spendgate admins may use the admin API.")
    if request.method != "GET" and not csrf_matches(principal, request.headers.get(CSRF_HEADER)):
        raise AdminError(
            403, "permission_error", f"A change made with a session needs its CSRF token in {CSRF_HEADER}."
        )
    return principal.actor


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(OPERATIONS))


OPERATIONS: tuple[Operation, ...] = (
    *TEAM_OPERATIONS,
    *USAGE_OPERATIONS,
    Operation(method="GET", path="/admin/openapi.json", handler=_openapi, summary="This document", answer=Document),
)
