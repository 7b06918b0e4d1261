"""The `/admin` routes: every operation, behind the admin token, its refusals in Anthropic's error shape."""

from __future__ import annotations

import secrets

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.display import explain
from proxy.errors import ProxyError, error_response
from proxy.ledger.teams import Conflict, NotFound
from proxy.surfaces.admin.openapi import openapi_document
from proxy.surfaces.admin.requests import Handler, Operation
from proxy.surfaces.admin.teams import TEAM_OPERATIONS
from proxy.surfaces.admin.usage import USAGE_OPERATIONS
from proxy.surfaces.admin_models import Document


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


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise AdminError(404, "not_found_error", "Not found. The admin API is off: set SPENDGATE_ADMIN_TOKEN.")
    given = request.headers.get("authorization", "")
    scheme, _, credential = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(credential.strip().encode(), token.encode()):
        raise AdminError(401, "authentication_error", "Send 'Authorization: Bearer <SPENDGATE_ADMIN_TOKEN>'.")


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(OPERATIONS))


OPERATIONS: tuple[Operation, ...] = (
    *TEAM_OPERATIONS,
    *USAGE_OPERATIONS,
    Operation(method="GET", path="/admin/openapi.json", handler=_openapi, summary="This document", answer=Document),
)
