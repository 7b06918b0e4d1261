"""The seam between the proxy and the HTTP client that talks to Anthropic.

Production uses aiohttp's connection pool directly: on this workload (one worker, 32 concurrent
connections) it sustains several times the request rate of httpx's own pool, and wrapping it in
httpx (`httpx-aiohttp`) costs a third of that again (see `bench/` and the commit introducing this
module). Tests and embedders inject any `httpx.AsyncBaseTransport` (MockTransport, respx, ASGITransport)
and get the same behaviour through `HTTPXUpstream`.

Both clients forward bytes untouched: no decompression, no added headers beyond Host and Content-Length.
Both translate their exceptions into `UpstreamTimeout` / `UpstreamUnreachable`, the only failures the
forwarder has to know about.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx
import yarl

from proxy.errors import UpstreamTimeout, UpstreamUnreachable

Headers = Sequence[tuple[bytes, bytes]]
# aiohttp adds these unless told not to; the client's own values (if any) are forwarded instead.
AIOHTTP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """An upstream response whose headers have arrived and whose body is still to be read."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class Upstream(Protocol):
    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a request; raises `UpstreamTimeout` or `UpstreamUnreachable`, and so does reading the body."""
        ...

    async def aclose(self) -> None: ...


class AiohttpUpstream:
    """The production client: aiohttp's keep-alive pool, with explicit timeouts."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300),
            # `total=None`: a generation may legitimately stream for many minutes; only silence is a failure.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            auto_decompress=False,
            skip_auto_headers=AIOHTTP_AUTO_HEADERS,
        )

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            # `encoded=True`: the URL is sent exactly as built from the route; yarl must not normalize it again
            # (it would turn `/v1/%2e/messages` into `/v1/messages`, and `/v1/../x` into `/x`).
            response = await self._session.request(
                method, yarl.URL(url, encoded=True), headers=decoded, data=body or None, allow_redirects=False
            )
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        return UpstreamResponse(
            status=response.status,
            headers=response.raw_headers,
            body=self._read(response),
            close=_release(response),
        )

    async def _read(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc

    async def aclose(self) -> None:
        await self._session.close()


def _release(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        # A body read to the end returns the connection to the pool; a half-read one must not be reused.
        if response.content.at_eof():
            response.release()
        else:
            response.close()

    return close


def _translate_aiohttp(exc: Exception) -> Exception:
    # aiohttp's timeouts all derive from the builtin TimeoutError; everything else it raises is a ClientError.
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"The upstream did not answer in time ({exc.__class__.__name__}). Try again later.")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamUnreachable(f"The upstream could not be reached: {exc}. Try again later.")
    return exc


class HTTPXUpstream:
    """Any httpx transport as the upstream: the seam tests use (MockTransport, respx, ASGITransport)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, connect_timeout: float, read_timeout: float) -> None:
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False)
        # httpx would add its own User-Agent, Accept, Accept-Encoding and Connection; we forward the client's.
        self._client.headers.clear()

    async def send(self, method: str, url: str, headers: Headers, body: bytes) -> UpstreamResponse:
        request = self._client.build_request(method, url, headers=list(headers), content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate_httpx(exc) from exc
        return UpstreamResponse(
            status=response.status_code,
            headers=response.headers.raw,
            body=self._read(response),
            close=response.aclose,
        )

    async def _read(self, response: httpx.Response) -> AsyncIterator[bytes]:
        if response.is_stream_consumed:
            # A transport may hand back a response built from bytes (MockTransport does): already read.
            yield response.content
            return
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _translate_httpx(exc) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _translate_httpx(exc: httpx.HTTPError) -> Exception:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream did not answer in time ({exc.__class__.__name__}). Try again later.")
    return UpstreamUnreachable(f"The upstream could not be reached: {exc.__class__.__name__}. Try again later.")
