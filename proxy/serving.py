"""The HTTP server: uvicorn with httptools, in one process or `workers` of them.

Each worker is a replica in all but name: its own instance id, crash journal, ledger writer, heartbeat and
budget leases, on the one ledger. They share the listening socket (uvicorn's supervisor restarts a worker that
dies; the dead one's holds and leases are recorded by the others' heartbeat reaper, its journal replayed by the
next worker to start).

httptools accepts a header of any size and copies the whole value for every chunk that arrives, so one client
sending a 100 MB header stalled every other call on the server for about 9 s (measured; see the README). h11
bounds heads but costs about twice the parser CPU. This keeps httptools and closes a connection whose head
passes `MAX_HEAD_BYTES`, answering 431 in Anthropic's error shape.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile

import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import Settings
from proxy.db import make_engine
from proxy.metrics import MULTIPROCESS_ENV, scrape_registry

logger = logging.getLogger("spendgate")
# The request line and every header together; nginx's default `large_client_header_buffers` allows 32 KB.
MAX_HEAD_BYTES = 64 * 1024
_BODY = json.dumps(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"The request's headers are over {MAX_HEAD_BYTES} bytes. Send smaller headers.",
        },
    }
).encode()
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"x-spendgate-error: headers_too_large\r\nx-should-retry: false\r\nconnection: close\r\n"
    + f"content-length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over `MAX_HEAD_BYTES`."""

    _head_bytes = 0
    _in_head = True
    _tail = b""

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            # Counted before httptools sees the bytes (it would copy an oversize header first), and only up to
            # the blank line that ends the head: the same read often carries the start of the body.
            seen = self._tail + data
            ends = [at + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (at := seen.find(mark)) >= 0]
            self._head_bytes += (min(ends) - len(self._tail)) if ends else len(data)
            self._tail = seen[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                logger.warning("closed a connection whose request head passed %d bytes", MAX_HEAD_BYTES)
                self.transport.write(_REFUSAL)
                self.transport.close()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()


def run(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C: in this process, or in `settings.workers` worker processes configured
    through the environment (the settings given as flags are passed on as `SPENDGATE_*` variables)."""
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "http": BoundedHttpToolsProtocol,
        # Upstream's own Date and Server headers pass through; uvicorn must not add a second pair.
        "server_header": False,
        "date_header": False,
        "timeout_graceful_shutdown": int(settings.graceful_shutdown_seconds),
    }
    if settings.workers == 1:
        uvicorn.run(_frozen(settings), **options)  # type: ignore[arg-type]
        return
    # Workers read their settings from here; the count tells each how many cores its siblings take.
    os.environ.update(
        SPENDGATE_DB_URL=settings.db_url,
        SPENDGATE_UPSTREAM_URL=settings.upstream_url,
        SPENDGATE_WORKERS=str(settings.workers),
    )
    # Every worker counts into files here, and a scrape sums them (prometheus_client's multiprocess mode); a fresh
    # folder per run, or counts from an earlier run would be added in.
    with tempfile.TemporaryDirectory(prefix="spendgate-metrics-") as counts:
        os.environ[MULTIPROCESS_ENV] = counts
        listener = None
        if settings.metrics_addr is not None:
            engine = make_engine(settings.db_url)
            host, port = settings.metrics_addr
            listener = start_http_server(port, host, registry=scrape_registry(None, engine, settings.metrics_users))[0]
        try:
            uvicorn.run("proxy.serving:worker_app", factory=True, workers=settings.workers, **options)  # type: ignore[arg-type]
        finally:
            if listener is not None:
                listener.shutdown()
                engine.dispose()


def worker_app() -> ASGIApp:
    """The app of one worker process (uvicorn imports this in each)."""
    from proxy.logs import configure_logging

    settings = Settings.from_environ(os.environ)
    configure_logging(settings.log_format)
    return _frozen(settings)


def _frozen(settings: Settings) -> ASGIApp:
    from proxy.app import create_app

    app = create_app(settings)
    # Objects made at start-up (the app, SQLAlchemy, pricing) live forever: keep them out of every collection,
    # or each full collection walks them all and stalls the event loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    return app
