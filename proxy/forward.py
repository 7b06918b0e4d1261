"""The hot path: authenticate, forward to Anthropic, relay the answer byte for byte, meter it, queue its record.

Every refusal is raised before `http.response.start`, so it can still become a JSON error. Once the
response has started a failure can only be recorded and the connection closed, which is what a client
talking to Anthropic directly would see too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Message, Receive, Scope, Send

from proxy.batches import (
    BATCHES,
    BatchOwner,
    BatchRoute,
    ResultsFetcher,
    batch_route,
    estimate_batch,
    find_batch,
    keep_owned,
    owned_ids,
    point_results_at,
    results_meter,
    save_batch,
)
from proxy.budgets import counters_for, reserve
from proxy.calls import COUNT_TOKENS, MESSAGES, Call, describe_call, label, note_summary
from proxy.errors import (
    BatchNotFound,
    LedgerUnavailable,
    ProxyError,
    RequestTooLarge,
    UnpricedModel,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.keys import KeyCache, KeyInfo, key_from_headers
from proxy.limits import cap_output, check_model, estimate_cost, input_token_bound
from proxy.pricing import PriceTable
from proxy.recorder import Recorder
from proxy.types import Reservation, UsageRecord
from proxy.upstream import Upstream, UpstreamResponse
from proxy.usage import StreamUsage, summarize_json

logger = logging.getLogger("spendgate")
T = TypeVar("T")

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# The client's credentials are replaced by ours; Host and Content-Length are set by the upstream client.
REQUEST_HEADERS_DROPPED = HOP_BY_HOP_HEADERS | {b"host", b"content-length", b"x-api-key", b"authorization"}
SPENDGATE_HEADER_PREFIX = b"x-spendgate-"
ZERO = Decimal(0)
# A batch can take 24 hours to end and its results are read later: its hold lasts two days unless settled.
BATCH_HOLD = timedelta(hours=48)
# The API's own limit for a batch create (other Messages calls: 32 MB, or SPENDGATE_MAX_BODY_BYTES).
BATCH_MAX_BODY_BYTES = 256 * 1024 * 1024
# nginx's convention for "the client closed the connection before a response was sent".
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The client closed the connection."""


class Forwarder:
    """The ASGI app serving every `/v1/*` path."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        upstream_url: str,
        upstream_key: str | None,
        keys: KeyCache,
        prices: PriceTable,
        recorder: Recorder,
        engine: Engine,
        max_body_bytes: int,
        default_max_output_tokens: int | None = None,
        reservation_ttl_seconds: float = 3600.0,
        budget_fail_open: bool = False,
        public_url: str | None = None,
        batch_results: ResultsFetcher | None = None,
    ) -> None:
        self._upstream = upstream
        self._upstream_url = upstream_url
        self._upstream_key = (upstream_key or "").encode("latin-1")
        self._keys = keys
        self._prices = prices
        self._recorder = recorder
        self._engine = engine
        self._max_body_bytes = max_body_bytes
        self._default_cap = default_max_output_tokens
        self._reservation_ttl = timedelta(seconds=reservation_ttl_seconds)
        self._fail_open = budget_fail_open
        self._public_url = public_url
        self._batch_results = batch_results

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        route = batch_route(method, path)
        endpoint = path if method == "POST" and path in (MESSAGES, COUNT_TOKENS) else None
        if route is not None and route.kind == "create":
            endpoint = BATCHES
        call = Call(endpoint)
        call.batch_route = route
        headers: dict[bytes, bytes] = dict(scope["headers"])
        if route is not None:
            # Where this client reached us: what batch objects' results_url must point at.
            call.public_url = f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1')}"
        try:
            limit = BATCH_MAX_BODY_BYTES if route is not None and route.kind == "create" else self._max_body_bytes
            body = await _read_body(receive, limit)
            key = await self._keys.authenticate(key_from_headers(headers))
            call.key, call.team, call.key_id, call.retry_window = key, key.team, key.key_id, key.retry_window_seconds
            request = describe_call(call, headers, body)
            call.request_body = body
            if request is not None and endpoint == MESSAGES:
                body = await self._preflight(call, key, request, body)
            if route is not None:
                body = await self._prepare_batch(call, key, route, request, body)
            await self._exchange(call, scope, receive, send, body)
        except ProxyError as error:
            unreachable = isinstance(error, UpstreamUnreachable | UpstreamTimeout)
            call.fail(error, "upstream_unreachable" if unreachable else "rejected")
            await _send_error(send, error, call.id)
        except ClientGone:
            call.status, call.outcome = CLIENT_CLOSED_REQUEST, "client_disconnected"
        except Exception:
            # A bug of ours: still recorded, then left to the server (a 500, or a closed connection).
            call.status, call.outcome, call.error_type = call.status or 500, "upstream_error", "internal_error"
            raise
        finally:
            if endpoint is not None:
                record = self._recorder_submit(call)
                logger.info(
                    "%s %s %d %s team=%s key=%s model=%s cost=%s id=%s %.1fms",
                    method,
                    path,
                    call.status,
                    call.outcome,
                    call.team,
                    call.key_id,
                    call.model,
                    record.cost_usd,
                    call.id,
                    record.latency_ms,
                )
            else:
                logger.info("%s %s %d %s key=%s", method, path, call.status, call.outcome, call.key_id)

    def _recorder_submit(self, call: Call) -> UsageRecord:
        record = call.to_record(self._prices)
        self._recorder.submit(record)
        return record

    async def _preflight(self, call: Call, key: KeyInfo, request: dict[str, Any], body: bytes) -> bytes:
        """Apply the team's rules and hold the call's worst-case cost; returns the body to forward."""
        check_model(call.model, key.models, key.team)
        capped = cap_output(request, body, cap=self._cap(key), policy=key.cap_policy, team=key.team)
        call.max_tokens_sent = capped.max_tokens
        estimate = partial(
            estimate_cost,
            request,
            model=call.model or "",
            input_tokens=input_token_bound(request, len(capped.body)),
            max_tokens=capped.max_tokens,
            prices=self._prices,
            at=call.started_at,
        )
        await self._hold_worst_case(call, key, estimate, ttl=self._reservation_ttl, what=f"Model {call.model!r}")
        return capped.body

    def _cap(self, key: KeyInfo) -> int | None:
        return key.max_output_tokens if key.max_output_tokens is not None else self._default_cap

    async def _hold_worst_case(
        self, call: Call, key: KeyInfo, estimate: Callable[[], Decimal | None], *, ttl: timedelta, what: str
    ) -> None:
        """Hold the call's worst case on its budgets; counters without a budget just record its spend later."""
        counters = counters_for(key, call.started_at)
        if all(counter.budget_usd is None for counter in counters):
            call.reservation = Reservation(call_id=call.id, counters=counters, amount=ZERO, held=False)
            return
        amount = estimate()
        if amount is None:
            raise UnpricedModel(
                f"{what} has no price, so team {key.team}'s budget cannot bound this call. Add the model to a price "
                "table named by SPENDGATE_PRICES (see `spendgate prices`), or use a priced model."
            )
        reservation = Reservation(call_id=call.id, counters=counters, amount=amount, held=True)
        await self._hold(call, reservation, expires_at=call.started_at + ttl)

    async def _hold(self, call: Call, reservation: Reservation, *, expires_at: datetime) -> None:
        """Take the hold (or raise `BudgetExceeded`); a ledger outage fails closed unless configured open."""
        try:
            await anyio.to_thread.run_sync(partial(reserve, self._engine, reservation, expires_at=expires_at))
        except SQLAlchemyError as exc:
            if not self._fail_open:
                raise LedgerUnavailable(
                    "The spend ledger did not answer, so the budget could not be checked and the call was not sent. "
                    "Try again shortly."
                ) from exc
            logger.warning("ledger unreachable; forwarding %s without a budget check (fail-open)", call.id)
            reservation = replace(reservation, amount=ZERO, held=False)
        call.reservation = reservation

    async def _prepare_batch(
        self, call: Call, key: KeyInfo, route: BatchRoute, request: dict[str, Any] | None, body: bytes
    ) -> bytes:
        """Apply the team's rules to a new batch and hold its worst case; refuse another team's batch as not found.

        Returns the body to forward (rewritten only when the output cap clamped some request).
        """
        if route.kind == "create":
            request, body = self._cap_batch(key, request or {}, body)
            estimate = partial(estimate_batch, request, self._prices, call.started_at)
            await self._hold_worst_case(call, key, estimate, ttl=BATCH_HOLD, what="A model in this batch")
            return body
        if route.batch_id is None and route.kind != "other":
            return body
        owner = await self._ledger(partial(find_batch, self._engine, route.batch_id)) if route.batch_id else None
        if owner is None or owner.team_id != key.team_id:
            raise BatchNotFound(
                f"No batch {route.batch_id} was created through spendgate by team {key.team}. "
                "Batches are visible only to the team that created them."
            )
        call.batch = owner
        if route.kind == "delete" and not owner.results_recorded and self._batch_results is not None:
            # Deleting a batch deletes its results: meter them first, or its spend would never be seen.
            await self._batch_results.record(owner, reader=key)
        return body

    def _cap_batch(self, key: KeyInfo, request: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """The allow-list and the output cap, applied to every request of a batch."""
        requests = request.get("requests")
        if not isinstance(requests, list):
            return request, body
        capped_requests, clamped = [], False
        for item in requests:
            params = item.get("params") if isinstance(item, dict) else None
            if isinstance(params, dict):
                model = params.get("model")
                check_model(model if isinstance(model, str) else None, key.models, key.team)
                capped = cap_output(params, b"", cap=self._cap(key), policy=key.cap_policy, team=key.team)
                if capped.body:
                    item, clamped = {**item, "params": json.loads(capped.body)}, True
            capped_requests.append(item)
        if not clamped:
            return request, body
        request = {**request, "requests": capped_requests}
        return request, json.dumps(request, separators=(",", ":")).encode()

    async def _exchange(self, call: Call, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        url = self._upstream_url + (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        # Exceptions must not escape the task group (anyio would wrap them in an ExceptionGroup).
        failure: Exception | None = None
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(_watch_disconnect, receive, call, watchers.cancel_scope)
            try:
                response = await self._upstream.send(scope["method"], url, self._upstream_headers(call, scope), body)
                try:
                    await self._relay(call, response, send)
                finally:
                    await response.close()
            except ClientGone:
                call.disconnected = True
            except Exception as error:
                failure = error
            finally:
                call.finished = True
                watchers.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if call.disconnected:
            call.outcome = "client_disconnected"

    def _upstream_headers(self, call: Call, scope: Scope) -> list[tuple[bytes, bytes]]:
        dropped = REQUEST_HEADERS_DROPPED | _connection_tokens(scope["headers"])
        forwarded = [
            (name, value)
            for name, value in scope["headers"]
            if name not in dropped and not name.startswith(SPENDGATE_HEADER_PREFIX)
        ]
        if call.endpoint is not None or call.batch_route is not None:
            # The usage tap reads the body as it passes, so metered calls ask for it uncompressed.
            forwarded = [(name, value) for name, value in forwarded if name != b"accept-encoding"]
            forwarded.append((b"accept-encoding", b"identity"))
        forwarded.append((b"x-api-key", self._upstream_key))
        return forwarded

    async def _relay(self, call: Call, response: UpstreamResponse, send: Send) -> None:
        call.status = response.status
        dropped = HOP_BY_HOP_HEADERS | _connection_tokens(response.headers)
        headers = [(name, value) for name, value in response.headers if name.lower() not in dropped]
        for name, value in headers:
            if name.lower() == b"request-id":
                call.upstream_request_id = label(value.decode("latin-1"), 200)
            elif name.lower() == b"content-type":
                call.streamed = value.startswith(b"text/event-stream")
        if response.status >= 400:
            call.outcome = "upstream_error"
        if call.endpoint is not None:
            # The id of this call's usage record; other paths leave none.
            headers.append((b"x-spendgate-request-id", call.id.encode()))
        if call.batch_route is not None:
            await self._relay_batch(call, call.batch_route, response, send, headers)
            return
        if call.endpoint is None or call.streamed:
            tap = StreamUsage() if call.endpoint is not None else None
            try:
                await _send_stream(call, response, send, headers, tap.feed if tap else None)
            finally:
                if tap is not None:
                    note_summary(call, tap.summary())
            return
        body = b"".join([chunk async for chunk in response.body])
        note_summary(call, summarize_json(body))
        if call.endpoint == MESSAGES:
            cost = call.cost(self._prices).cost_usd
            if cost is not None:
                headers.append((b"x-spendgate-cost-usd", format(cost, "f").encode()))
        call.first_byte = time.perf_counter()
        await _send_guarded(call, send, {"type": "http.response.start", "status": response.status, "headers": headers})
        await _send_guarded(call, send, {"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_batch(
        self,
        call: Call,
        route: BatchRoute,
        response: UpstreamResponse,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Relay a batch answer: meter results as they stream; point batch objects' `results_url` at us."""
        if route.kind == "results" and response.status == 200 and call.batch is not None and call.key is not None:
            await self._relay_results(call, call.batch, call.key, response, send, headers)
            return
        body = b"".join([chunk async for chunk in response.body])
        if response.status < 300 and call.key is not None:
            body = await self._ledger(partial(self._rewrite_batch, call, route, call.key, body))
        headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        call.first_byte = time.perf_counter()
        await _send_guarded(call, send, {"type": "http.response.start", "status": response.status, "headers": headers})
        await _send_guarded(call, send, {"type": "http.response.body", "body": body, "more_body": False})

    def _rewrite_batch(self, call: Call, route: BatchRoute, key: KeyInfo, body: bytes) -> bytes:
        """Record a new batch's owner, filter lists to the caller's team, and rewrite `results_url` (blocking)."""
        if route.kind == "delete":
            return body
        if route.kind == "create" and call.reservation is not None:
            try:
                created = json.loads(body)
            except ValueError:
                created = None
            batch_id = created.get("id") if isinstance(created, dict) else None
            if not isinstance(batch_id, str):
                logger.error("batch create answered %s without a batch id; its hold is released", call.id)
                return body
            try:
                save_batch(self._engine, batch_id=batch_id, key=key, hold_call_id=call.id, created_at=call.started_at)
            except SQLAlchemyError:
                # The batch exists upstream: hand it to the client all the same (a 5xx would make the SDK create
                # a second one), and say loudly that spendgate does not know it.
                logger.exception(
                    "batch %s was created but could not be recorded; its results are not metered", batch_id
                )
                return point_results_at(body, self._public_url or call.public_url)
            # The hold now covers the batch: it is released by the record of the batch's last result.
            call.reservation = replace(call.reservation, held=False)
        if route.kind == "list":
            body = keep_owned(body, lambda ids: owned_ids(self._engine, key.team_id, ids))
        return point_results_at(body, self._public_url or call.public_url)

    async def _relay_results(
        self,
        call: Call,
        batch: BatchOwner,
        reader: KeyInfo,
        response: UpstreamResponse,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        meter = await self._ledger(
            partial(
                results_meter, self._engine, batch, reader=reader, prices=self._prices, submit=self._recorder.submit
            )
        )
        complete = False
        try:
            await _send_stream(call, response, send, headers, meter.feed if meter else None)
            complete = call.outcome == "ok"
        finally:
            if meter is not None:
                meter.finish(complete=complete)

    async def _ledger(self, work: Callable[[], T]) -> T:
        """Run blocking ledger work in a thread; a database failure becomes a 503 in Anthropic's shape."""
        try:
            return await anyio.to_thread.run_sync(work)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable("The spend ledger did not answer. Try again shortly.") from exc


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection`: hop-by-hop for this connection only (RFC 9110 §7.6.1)."""
    return frozenset(
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",")
    )


async def _send_stream(
    call: Call,
    response: UpstreamResponse,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    tap: Callable[[bytes], None] | None,
) -> None:
    await _send_guarded(call, send, {"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        async for chunk in response.body:
            if tap is not None:
                tap(chunk)
            if call.first_byte is None:
                call.first_byte = time.perf_counter()
            await _send_guarded(call, send, {"type": "http.response.body", "body": chunk, "more_body": True})
    except ProxyError as error:
        # Too late for a JSON error: record why and end without completing, so the client sees a broken
        # connection exactly as it would talking to Anthropic directly.
        call.outcome = "upstream_unreachable"
        call.error_type = error.reason
        logger.warning("upstream failed mid-response on %s: %s", call.id, error.message)
        return
    await _send_guarded(call, send, {"type": "http.response.body", "body": b"", "more_body": False})


async def _send_guarded(call: Call, send: Send, message: Message) -> None:
    try:
        await send(message)
    except OSError:
        # ASGI servers advertising spec 2.4+ raise on a closed client instead of dropping the message.
        raise ClientGone from None


async def _watch_disconnect(receive: Receive, call: Call, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if call.finished:
        return
    call.disconnected = True
    if call.streamed or call.endpoint is None:
        scope.cancel()
    # A non-streaming call keeps going: Anthropic bills it anyway, and finishing it gives the exact usage.


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(
                f"The request body is over {limit} bytes, the limit for a Messages request. Send a smaller request."
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_error(send: Send, error: ProxyError, request_id: str) -> None:
    body = error.body()
    headers = [
        *error.headers(),
        (b"content-length", str(len(body)).encode()),
        (b"x-spendgate-request-id", request_id.encode()),
    ]
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
