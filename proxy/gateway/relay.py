"""The relay: send a classified call upstream and hand its answer back, byte for byte.

The upstream URL is built from the `Route` alone, never from what the client typed. Every refusal is raised
before `http.response.start`, so it can still become a JSON error; once the answer has started, a failure
can only be noted and the connection closed, which is what a client of Anthropic itself would see.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from starlette.types import Message, Receive, Scope, Send

from proxy.errors import ProxyError
from proxy.gateway.bodies import ClientGone
from proxy.gateway.call import Call, label
from proxy.gateway.routes import Route
from proxy.gateway.upstream import Upstream, UpstreamResponse
from proxy.ledger.journal import Start
from proxy.ledger.writer import Writer

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
# Milliseconds spendgate added before the answer started: arrival to first byte, minus the upstream's part.
OVERHEAD_HEADER = b"x-spendgate-overhead-ms"
CLAMPED_HEADER = b"x-spendgate-clamped-max-tokens"
Headers = list[tuple[bytes, bytes]]
# Relays one upstream answer to the client: given the answer and the response headers to send.
Responder = Callable[[UpstreamResponse, Headers], Awaitable[None]]


class Relay:
    """Sends calls to the upstream with spendgate's key and streams the answers back."""

    def __init__(self, upstream: Upstream, *, upstream_url: str, upstream_key: str | None, ledger: Writer) -> None:
        self._upstream = upstream
        self._ledger = ledger
        self._upstream_url = upstream_url
        self._upstream_key = (upstream_key or "").encode("latin-1")

    async def exchange(
        self,
        call: Call,
        route: Route,
        scope: Scope,
        receive: Receive,
        body: bytes,
        respond: Responder,
        *,
        identity: bool | None = None,
    ) -> None:
        """Send the call and let `respond` relay the answer, while watching for the client leaving. `identity`: ask
        for the answer uncompressed (by default, on every route spendgate knows)."""
        url = self._upstream_url + route.path
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("ascii")
        # A plain asyncio task, not a task group: this runs on every call, and anyio's scopes cost about 40 µs.
        this = cast("asyncio.Task[Any]", asyncio.current_task())  # a request is always served in a task
        answered = False
        watcher = asyncio.create_task(_watch_disconnect(receive, call, this, lambda: answered))
        try:
            self._ledger.began(_start(call, len(body)))
            call.forwarded = True
            headers = self._headers(scope, identity=route.kind != "other" if identity is None else identity)
            call.sent = time.perf_counter()
            response = await self._upstream.send(scope["method"], url, headers, body)
            call.upstream_done = time.perf_counter()
            try:
                call.status = call.facts.status = response.status
                await respond(response, self._response_headers(call, response))
                answered = True
            finally:
                await response.close()
        except ClientGone:
            call.facts.disconnected = True
        except asyncio.CancelledError:
            # Cut because the client left (the watcher's one cancel), unless the server cancels too (shutdown).
            if not (watcher.done() and not watcher.cancelled() and watcher.result() and this.uncancel() == 0):
                raise
        finally:
            watcher.cancel()

    def _headers(self, scope: Scope, *, identity: bool) -> Headers:
        dropped = REQUEST_HEADERS_DROPPED | _connection_tokens(scope["headers"])
        forwarded = [
            (name, value)
            for name, value in scope["headers"]
            if name not in dropped and not name.startswith(SPENDGATE_HEADER_PREFIX)
        ]
        if identity:
            # Taps and rewrites read the body as it passes, so the routes spendgate knows ask for it uncompressed.
            forwarded = [(name, value) for name, value in forwarded if name != b"accept-encoding"]
            forwarded.append((b"accept-encoding", b"identity"))
        forwarded.append((b"x-api-key", self._upstream_key))
        return forwarded

    def _response_headers(self, call: Call, response: UpstreamResponse) -> Headers:
        dropped = HOP_BY_HOP_HEADERS | _connection_tokens(response.headers)
        headers = [(name, value) for name, value in response.headers if name.lower() not in dropped]
        for name, value in headers:
            if name.lower() == b"request-id":
                call.upstream_request_id = label(value.decode("latin-1"), 200)
        # The id of this call's usage record: every call through spendgate has one.
        headers.append((b"x-spendgate-request-id", call.id.encode()))
        if call.max_tokens_sent is not None and call.max_tokens_sent != call.max_tokens:
            # The output cap or the budget edge lowered it: the client learns what its answer had room for.
            headers.append((CLAMPED_HEADER, str(call.max_tokens_sent).encode()))
        if call.ticket is not None:
            headers.extend(call.ticket.headers)
        return headers


async def stream_back(
    call: Call, response: UpstreamResponse, send: Send, headers: Headers, tap: Callable[[bytes], None] | None
) -> None:
    """Relay the answer chunk by chunk as it arrives, showing each chunk to `tap` first."""
    headers.append((OVERHEAD_HEADER, call.overhead_ms().encode()))
    await send_guarded(send, {"type": "http.response.start", "status": response.status, "headers": headers})
    try:
        async for chunk in response.body:
            now = call.upstream_done = time.perf_counter()
            if tap is not None:
                tap(chunk)
            if call.first_byte is None:
                call.first_byte = now
            await send_guarded(send, {"type": "http.response.body", "body": chunk, "more_body": True})
    except ProxyError as error:
        # Too late for a JSON error: note why and end without completing, so the client sees a broken
        # connection exactly as it would talking to Anthropic directly.
        call.facts.cut = error
        return
    await send_guarded(send, {"type": "http.response.body", "body": b"", "more_body": False})


async def read_whole(response: UpstreamResponse, call: Call | None = None) -> bytes:
    """The whole upstream body (for answers spendgate must read before relaying them); for a `call`, the
    upstream's part is done when it has arrived."""
    body = b"".join([chunk async for chunk in response.body])
    if call is not None:
        call.upstream_done = time.perf_counter()
    return body


async def send_whole(call: Call, send: Send, status: int, headers: Headers, body: bytes) -> None:
    """Send a complete answer at once, with its Content-Length set to the body sent."""
    headers = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((OVERHEAD_HEADER, call.overhead_ms().encode()))
    call.first_byte = time.perf_counter()
    await send_guarded(send, {"type": "http.response.start", "status": status, "headers": headers})
    await send_guarded(send, {"type": "http.response.body", "body": body, "more_body": False})


async def send_guarded(send: Send, message: Message) -> None:
    """`send`, with a closed client as `ClientGone`."""
    try:
        await send(message)
    except OSError:
        # ASGI servers advertising spec 2.4+ raise on a closed client instead of dropping the message.
        raise ClientGone from None


def _start(call: Call, size: int) -> Start:
    """What the crash journal keeps of a call as it goes out."""
    key, hold = call.key, call.hold
    return Start(
        id=call.id,
        started_at=call.started_at,
        team=key.team if key else None,
        key_id=key.key_id if key else None,
        feature=call.feature,
        user=call.user,
        endpoint=call.endpoint,
        model=call.model,
        streamed=call.streamed,
        max_tokens=call.max_tokens_sent,
        input_bound=size,
        held=hold.amount if hold is not None and (hold.held or hold.lease) else None,
        metered=call.metered,
        session=call.session,
        agent=call.agent,
        parent_agent=call.parent_agent,
    )


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection`: hop-by-hop for this connection only (RFC 9110 §7.6.1)."""
    return frozenset(
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",")
    )


async def _watch_disconnect(
    receive: Receive, call: Call, caller: asyncio.Task[Any], answered: Callable[[], bool]
) -> bool:
    """Note a client that leaves before its answer is complete; cut the call (True) if it streams or is not
    metered."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if answered():
        return False
    call.facts.disconnected = True
    if call.streamed or not call.metered:
        caller.cancel()
        return True
    # A non-streaming Messages call keeps going: Anthropic bills it anyway, and finishing it gives the exact usage.
    return False
