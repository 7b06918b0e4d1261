"""Real servers on loopback for wire-level tests: an ASGI app under uvicorn in a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from tests.waiting import wait_until


class ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        # Signals belong to the test runner's main thread.
        pass


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, **options: Any) -> Iterator[str]:
    """Serve `app` on a free loopback port (with more `uvicorn.Config` options); yields its base URL and stops it
    (lifespan included) on exit."""
    # Idle connections are kept longer than the proxy's pool keeps them (aiohttp: 15 s): with uvicorn's default
    # (5 s) a connection the fake closes just as the proxy reuses it fails that call with a 502, a race between
    # two idle timers rather than anything the tests check.
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "warning",
        "server_header": False,
        "date_header": False,
        "lifespan": "on",
        "timeout_keep_alive": 60,
    }
    config = uvicorn.Config(app, **{**settings, **options})
    server = ThreadedServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("test server did not start")
        return server.started

    wait_until(started, "the test server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
