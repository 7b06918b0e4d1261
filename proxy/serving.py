"""The HTTP server: uvicorn with httptools, in one process or `workers` of them.

Each worker is a replica in all but name: its own instance id, crash journal, ledger writer, heartbeat and
budget leases, on the one ledger. They share the listening socket (uvicorn's supervisor restarts a worker that
dies; the dead one's holds and leases are recorded by the others' heartbeat reaper, its journal replayed by the
next worker to start).

httptools accepts a header of any size and copies the whole value for every chunk that arrives, so one client
sending a 100 MB header stalled every other call on the server for about 9 s (measured; see docs/design.md). h11
bounds heads but costs about twice the parser CPU. This keeps httptools and closes a connection whose head
passes `MAX_HEAD_BYTES`, answering 431 in Anthropic's error shape.

A connection holds a file descriptor from the moment it is accepted, before any byte or key, and uvicorn closes
only idle keep-alive connections: 300 connections that never finished their head took a server with 256
descriptors out of service (measured: every valid call refused). Heads are held to a deadline, and connections
whose head is still arriving to a bound per client address and one for the process, past which the oldest is
closed (`PendingHeads`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import tempfile
from collections import Counter, OrderedDict
from typing import ClassVar

import uvicorn
from prometheus_client import start_http_server
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.config import Settings
from proxy.instruments import MULTIPROCESS_ENV
from proxy.ledger.db import make_engine
from proxy.surfaces.metrics import scrape_registry

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
# The bound on pending heads in all is half the file descriptors this process may open (the rest are for calls in
# flight, upstream connections, the ledger), but never below one client address's default allowance, nor above
# what memory comfortably holds: a pending head takes about 9 KB (measured), so half of a container's usual limit
# (1,048,576) would let an attacker with many addresses take 4.7 GB.
MIN_PENDING_HEADS = 32
MAX_PENDING_HEADS = 10_000
# A head not in after this long (or half the head timeout, if shorter) counts against its client address's bound.
STALLED_AFTER_SECONDS = 1.0
# While connections keep being closed for their heads, how often a summary is logged (the first one is at once).
CLOSURES_LOGGED_EVERY_SECONDS = 60.0


def _head_timeout_refusal(seconds: float) -> bytes:
    body = json.dumps(
        {
            "type": "error",
            "error": {
                "type": "timeout_error",
                "message": f"The request's headers did not arrive within {seconds:g} seconds. Send them faster, "
                "or ask your spendgate admin to raise SPENDGATE_HEAD_TIMEOUT_SECONDS.",
            },
        }
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"x-spendgate-error: head_timeout\r\nx-should-retry: false\r\nconnection: close\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )


class PendingHeads:
    """This process's connections whose request head is still arriving, and the rules they are held to: a deadline
    (`timeout` seconds), at most `per_client` stalled ones (no head within `stall_seconds`) per client address (0:
    no such bound) and `total` in all.

    Past a bound the oldest connection is closed, not the newest: a client sharing an address with an attacker gets
    its head through in milliseconds, while the attacker's stalled connections are churned out. A load balancer or a
    fleet behind one NAT (every connection from one address, opened in bursts) is unaffected: its heads arrive
    before they count as stalled.
    """

    def __init__(self, timeout: float, per_client: int, total: int) -> None:
        self.timeout = timeout
        self.per_client = per_client
        self.total = total
        self.refusal = _head_timeout_refusal(timeout)
        # OrderedDict, not dict: finding a plain dict's first entry walks past every entry deleted before it, so
        # under churn each eviction would cost as much as the dict is long (measured: 100x slower at 200,000).
        self._all: OrderedDict[BoundedHttpToolsProtocol, None] = OrderedDict()
        self._by_client: dict[str | None, OrderedDict[BoundedHttpToolsProtocol, None]] = {}
        self._closures = _Closures(self)

    @classmethod
    def of(cls, settings: Settings) -> PendingHeads:
        """The rules in `settings`, with the bound in all taken from this process's file-descriptor limit now."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        total = max(MIN_PENDING_HEADS, min(soft // 2, MAX_PENDING_HEADS))
        return cls(settings.head_timeout_seconds, settings.max_pending_heads_per_client, total)

    @property
    def stall_seconds(self) -> float:
        """How long a head may take before it counts against its address: a head arrives in milliseconds, but a
        burst of connections from one address (a fleet behind one NAT, a load balancer warming its pool) is
        accepted faster than a busy event loop reads their heads, and must not close its own connections."""
        return min(STALLED_AFTER_SECONDS, self.timeout / 2)

    def add(self, connection: BoundedHttpToolsProtocol) -> None:
        """Count `connection` as waiting for its head (if not yet counted); close the oldest past the bound in
        all (every connection holds a file descriptor from the moment it is accepted)."""
        if connection in self._all:
            return
        self._all[connection] = None
        if len(self._all) > self.total:
            self.close(next(iter(self._all)), "total")

    def stalled(self, connection: BoundedHttpToolsProtocol) -> None:
        """Count `connection`, whose head has not come within `stall_seconds`, against its address; close that
        address's oldest stalled one past the bound."""
        if connection not in self._all:
            return
        same = self._by_client.setdefault(connection.address, OrderedDict())
        same[connection] = None
        if self.per_client and len(same) > self.per_client:
            self.close(next(iter(same)), "client")

    def discard(self, connection: BoundedHttpToolsProtocol) -> None:
        """Stop counting `connection`: its head arrived, or it is gone."""
        if connection not in self._all:
            return
        del self._all[connection]
        same = self._by_client.get(connection.address)
        if same is not None and connection in same:
            del same[connection]
            if not same:
                del self._by_client[connection.address]

    def close(self, connection: BoundedHttpToolsProtocol, why: str) -> None:
        """Close `connection` for its head: `timeout` (answered 408 if part of the head came), or past the bound
        per `client` address or in `total`."""
        answered = why == "timeout" and connection.head_begun
        connection.stop_waiting()
        self._closures.note(why, connection)
        if answered:
            connection.transport.write(self.refusal)
        connection.transport.close()


class _Closures:
    """Connections closed for their heads: the first logged at once, the rest summed up every minute while they go
    on. An attacker's thousands of connections must not become thousands of log lines."""

    def __init__(self, heads: PendingHeads) -> None:
        self._why = {
            "timeout": f"its request head took over {heads.timeout:g} s (SPENDGATE_HEAD_TIMEOUT_SECONDS)",
            "client": f"over {heads.per_client} heads still arriving from its address "
            "(SPENDGATE_MAX_PENDING_HEADS_PER_CLIENT)",
            "total": f"over {heads.total} heads still arriving in all",
        }
        self._counts: Counter[str] = Counter()
        self._clients: set[str | None] = set()
        self._summary: asyncio.TimerHandle | None = None

    def note(self, why: str, connection: BoundedHttpToolsProtocol) -> None:
        """Log the closing of `connection`, or count it for the next summary."""
        if self._summary is None:
            logger.warning("closed a connection from %s: %s", connection.address, self._why[why])
            self._summary = connection.loop.call_later(CLOSURES_LOGGED_EVERY_SECONDS, self._log, connection.loop)
            return
        self._counts[why] += 1
        # Distinct addresses are counted up to a point: an attacker with a whole IPv6 prefix has billions.
        if len(self._clients) < 10_000:
            self._clients.add(connection.address)

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._counts:
            self._summary = None
            return
        logger.warning(
            "closed %d more connections in the last %g s, from %s%d address(es): %s",
            self._counts.total(),
            CLOSURES_LOGGED_EVERY_SECONDS,
            "at least " if len(self._clients) >= 10_000 else "",
            len(self._clients),
            "; ".join(f"{count} as {self._why[why]}" for why, count in self._counts.most_common()),
        )
        self._counts.clear()
        self._clients.clear()
        self._summary = loop.call_later(CLOSURES_LOGGED_EVERY_SECONDS, self._log, loop)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over `MAX_HEAD_BYTES`, and closing connections whose
    head does not come in time or is one too many still coming (`heads`, shared by this process's connections)."""

    heads: ClassVar[PendingHeads] = PendingHeads.of(Settings())
    address: str | None = None
    # Whether the awaited head has begun (the parser started a request), which earns an answer at the deadline.
    head_begun = False
    # One timer while a head is awaited: first to when it counts as stalled, then to its deadline.
    _head_timer: asyncio.TimerHandle | None = None
    _head_stalled = False
    _head_bytes = 0
    _in_head = True
    _tail = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else None
        self._await_head()
        # Counted from the start, bytes or not: a connection that never sends one is the cheapest attack.
        self.heads.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_waiting()
        super().connection_lost(exc)

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
        # A kept-alive connection counts once its next request has begun: idle ones (a load balancer's pool) are
        # left to uvicorn's keep-alive timeout, and counting them would close a pool's connections as it reuses them.
        if self.head_begun and self._head_timer is not None and not self.transport.is_closing():
            self.heads.add(self)
            if self._head_stalled:  # slow already: it counts against its address at once
                self.heads.stalled(self)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        self.head_begun = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request whose head came during this response is started now: no head is awaited then.
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_head()
            if self.head_begun:
                self.heads.add(self)

    def stop_waiting(self) -> None:
        """No head is awaited any more (it came, or the connection is closing): end the deadline and the count."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_stalled = False
        self.head_begun = False
        self.heads.discard(self)

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self.heads.stall_seconds, self._head_slow)

    def _head_slow(self) -> None:
        self._head_stalled = True
        self._head_timer = self.loop.call_later(self.heads.timeout - self.heads.stall_seconds, self._head_late)
        if not self.transport.is_closing():
            self.heads.stalled(self)

    def _head_late(self) -> None:
        if not self.transport.is_closing():
            self.heads.close(self, "timeout")


def run(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C: in this process, or in `settings.workers` worker processes configured
    through the environment (the settings given as flags are passed on as `SPENDGATE_*` variables)."""
    _raise_open_files_limit()
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
        BoundedHttpToolsProtocol.heads = PendingHeads.of(settings)
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
    BoundedHttpToolsProtocol.heads = PendingHeads.of(settings)
    return _frozen(settings)


def _raise_open_files_limit() -> None:
    # Every connection is a file descriptor, and the usual soft limit (1024) is far below what the hard limit
    # allows a server; worker processes inherit the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:  # macOS: an unlimited hard limit that setrlimit refuses
        logger.info("kept the open-files limit at %d (could not raise it to %d: %s)", soft, hard, error)


def _frozen(settings: Settings) -> ASGIApp:
    from proxy.app import create_app

    app = create_app(settings)
    # Objects made at start-up (the app, SQLAlchemy, pricing) live forever: keep them out of every collection,
    # or each full collection walks them all and stalls the event loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    return app
