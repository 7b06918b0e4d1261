#!/usr/bin/env python3
"""The Python floor: a bare pass-through for `POST /v1/messages`, which bench/run measures spendgate against.

    python bench/floor.py --port PORT --upstream http://127.0.0.1:UPSTREAM_PORT [--host 127.0.0.1]

Each call is forwarded to the upstream with the client's headers (less hop-by-hop ones, Host, Content-Length
and the client's key, which is replaced by ANTHROPIC_API_KEY), and the answer is streamed back as it arrives,
JSON or SSE, with the upstream's status and headers. Nothing else: no key check, no metering, no ledger, no log
line, no watching for clients that leave. What is left is what uvicorn, Starlette and aiohttp cost, served the
way `spendgate serve` serves (see proxy/cli/serve.py): httptools, uvicorn's default event loop (uvloop when
installed), no Server or Date header added, start-up objects frozen out of the garbage collector; Starlette
holds the lifespan and /v1 skips its middleware, as in spendgate's `Dispatch`. A gateway on this stack cannot
go under it. It runs on the interpreter spendgate runs on, with spendgate's own dependencies only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
import yarl
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
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
REQUEST_DROPPED = HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization"}
# aiohttp adds these unless told not to; the client's own values (if any) are forwarded instead.
AIOHTTP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Forward:
    """The one endpoint, as plain ASGI: read the body, send it upstream, stream the answer back."""

    def __init__(self, upstream_url: str, api_key: str) -> None:
        self.url = yarl.URL(upstream_url.rstrip("/") + "/v1/messages", encoded=True)
        self.api_key = api_key
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None, "the lifespan has not started"
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"] if n not in REQUEST_DROPPED]
        headers.append(("x-api-key", self.api_key))
        async with self.session.post(self.url, headers=headers, data=body, allow_redirects=False) as response:
            answer = [(name, value) for name, value in response.raw_headers if name.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": answer})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """aiohttp's keep-alive pool, set up as spendgate sets up its own (proxy/gateway/upstream.py)."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            auto_decompress=False,
            skip_auto_headers=AIOHTTP_AUTO_HEADERS,
        )
        try:
            yield
        finally:
            await self.session.close()


async def read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class Floor:
    """`POST /v1/messages` goes straight to `Forward`; the lifespan and anything else (404, 405) to Starlette."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.app = Starlette(lifespan=forward.lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/messages" and scope["method"] == "POST":
            await self.forward(scope, receive, send)
            return
        await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare Starlette + aiohttp pass-through for POST /v1/messages.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:8081")
    args = parser.parse_args()
    app = Floor(Forward(args.upstream, os.environ.get("ANTHROPIC_API_KEY", "")))
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        http="httptools",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
