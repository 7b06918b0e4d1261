"""Request bodies: read whole, bounded in size (refused as soon as a body is known to pass its limit) and in time,
with at most one body larger than the ordinary limit in memory at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.types import Receive

from proxy.errors import BodyTimeout, Overloaded, RequestTooLarge
from proxy.gateway.routes import Route

# The API's own limit for a batch create; other requests: SPENDGATE_MAX_BODY_BYTES (the API's 32 MB).
BATCH_MAX_BODY_BYTES = 256 * 1024 * 1024


class ClientGone(Exception):
    """The client closed the connection."""


class Bodies:
    """The bodies of the gateway's requests, under its size and time limits."""

    def __init__(self, *, max_body_bytes: int, timeout_seconds: float) -> None:
        self._max_body_bytes = max_body_bytes
        self._timeout_seconds = timeout_seconds
        # One body larger than the ordinary limit at a time (only batch creates can be).
        self._large = asyncio.Lock()

    async def read(self, receive: Receive) -> bytes:
        """The whole body of a request that is not a batch call, bounded in size and in time (`BodyTimeout`)."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                return await receive_body(receive, self._max_body_bytes)
        except TimeoutError:
            raise self._timed_out() from None

    @contextlib.asynccontextmanager
    async def batch(self, route: Route, receive: Receive) -> AsyncIterator[bytes]:
        """The whole body of a batch call, bounded in size for the route and in time (`BodyTimeout`). A body larger
        than the ordinary limit (only batch creates may be: up to 256 MB) waits for the one turn such bodies have, and
        keeps it until the block ends (the call is done with it): a few of them at once took gigabytes. A turn that
        does not come within the body's time is `Overloaded`."""
        limit = BATCH_MAX_BODY_BYTES if route.kind == "batch_create" else self._max_body_bytes
        waiting = False

        async def take_large_turn() -> None:
            nonlocal waiting
            waiting = True
            await held.enter_async_context(self._large)
            waiting = False

        async with contextlib.AsyncExitStack() as held:
            try:
                async with asyncio.timeout(self._timeout_seconds):
                    large = (self._max_body_bytes, take_large_turn)
                    body = await receive_body(receive, limit, large=large)
            except TimeoutError:
                if waiting:
                    raise Overloaded(
                        f"spendgate takes in one request body over {self._max_body_bytes} bytes at a time, and "
                        "another one kept its turn while this one waited. Try again later."
                    ) from None
                raise self._timed_out() from None
            yield body

    def _timed_out(self) -> BodyTimeout:
        return BodyTimeout(
            f"The request body did not arrive within {self._timeout_seconds:g} seconds. Send it faster, "
            "or ask your spendgate admin to raise SPENDGATE_BODY_TIMEOUT_SECONDS."
        )


async def receive_body(
    receive: Receive,
    limit: int,
    *,
    content_length: str | None = None,
    large: tuple[int, Callable[[], Awaitable[None]]] | None = None,
) -> bytes:
    """The whole request body, or `RequestTooLarge` as soon as it is known to pass `limit` bytes: from its
    `content_length` before a byte is read, else (chunked) as they arrive, so that no more than `limit` bytes
    and a chunk are ever held. `ClientGone` if the client leaves first. With `large` (a size and a wait), the
    bytes past that size are read only once the wait is over (meanwhile TCP holds the client's sending back)."""
    # The server has checked the header's form already; the guard keeps a server that did not from making a 500.
    if content_length and content_length.isascii() and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if large is not None and size <= large[0] < size + len(chunk):
            await large[1]()
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is over {limit} bytes, the limit for this request. Send a smaller request."
    )
