"""What every admin route shares: its declaration (`Operation`, from which the OpenAPI document is also made) and
the reading of its request (the body, instants, who is asking) and running of its ledger work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio.to_thread
from pydantic import BaseModel
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import ledger_errors
from proxy.gateway.bodies import receive_body
from proxy.gateway.validate import parse_object
from proxy.types import parse_instant

Handler = Callable[[Request], Awaitable[Response]]
# Every admin body is a handful of fields (the largest, a team with its model list, a few KB).
MAX_BODY_BYTES = 1024 * 1024


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


def actor(request: Request) -> str:
    """Who made this request, as the audit trail names them: `admin-token` or `oidc:<sub>`."""
    who: str = request.state.actor
    return who


async def on_ledger(request: Request, work: Callable[[Engine], Any]) -> Any:
    """`work(engine)`'s result, run in a worker thread, its database failures mapped to API errors."""
    engine: Engine = request.state.engine
    with ledger_errors():
        return await anyio.to_thread.run_sync(work, engine)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, at most `MAX_BODY_BYTES`."""
    content_length = request.headers.get("content-length")
    body = await receive_body(request.receive, MAX_BODY_BYTES, content_length=content_length)
    # Money arrives as JSON numbers too: parse them as exact decimals, never floats.
    return parse_object(body, "the request's fields", parse_float=Decimal)


def instant(raw: str | None, field: str) -> datetime | None:
    """The query parameter `field` as an instant (None when absent); a bad one is a ValueError naming it."""
    try:
        return None if raw is None else parse_instant(raw)
    except ValueError as error:
        raise ValueError(f"'{field}': {error}") from None
