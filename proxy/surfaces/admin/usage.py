"""The admin routes for what was spent: usage records in pages, and spend totals by group."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.ledger.export import Cursor, iter_usage
from proxy.ledger.reports import REPORT_PAGE, ReportPage, report, report_page
from proxy.pricing.table import PriceTable
from proxy.surfaces.admin.requests import Operation, instant, on_ledger
from proxy.surfaces.admin_models import Report, ReportQuery, UsagePage, UsageQuery


async def _usage(request: Request) -> Response:
    query = UsageQuery.model_validate(dict(request.query_params))
    limit, team, session = query.limit, query.team, query.session
    after = _decode_cursor(query.cursor) if query.cursor is not None else None
    since, until = instant(query.since, "since"), instant(query.until, "until")

    def page(engine: Engine) -> list[tuple[Cursor, dict[str, Any]]]:
        return list(
            iter_usage(engine, team=team, session=session, since=since, until=until, after=after, limit=limit + 1)
        )

    rows = await on_ledger(request, page)
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode_cursor(rows[-1][0]) if has_more else None
    return JSONResponse({"data": [record for _, record in rows], "has_more": has_more, "next_cursor": next_cursor})


async def _report(request: Request) -> Response:
    query = ReportQuery.model_validate(dict(request.query_params))
    by, cursor = query.groups(), query.cursor
    since, until = instant(query.since, "since"), instant(query.until, "until")
    prices: PriceTable = request.state.prices
    if query.limit is None and cursor is None:
        rows = await on_ledger(request, lambda engine: report(engine, prices, by=by, since=since, until=until))
        return JSONResponse({"data": [row.to_json() for row in rows], "has_more": False, "next_cursor": None})
    limit = query.limit or REPORT_PAGE

    def page(engine: Engine) -> ReportPage:
        return report_page(engine, prices, by=by, limit=limit, cursor=cursor, since=since, until=until)

    found = await on_ledger(request, page)
    return JSONResponse(
        {
            "data": [row.to_json() for row in found.rows],
            "has_more": found.next_cursor is not None,
            "next_cursor": found.next_cursor,
        }
    )


def _encode_cursor(cursor: Cursor) -> str:
    started_at, seq = cursor
    return base64.urlsafe_b64encode(f"{started_at.isoformat()}|{seq}".encode()).decode()


def _decode_cursor(raw: str) -> Cursor:
    try:
        started_at, _, seq = base64.urlsafe_b64decode(raw.encode()).decode().partition("|")
        return datetime.fromisoformat(started_at), int(seq)
    except ValueError:
        raise ValueError("'cursor' is not one this API returned") from None


USAGE_OPERATIONS = (
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
)
