"""`spendgate serve`: refuse early what would keep the proxy from serving, migrate the ledger, then serve."""

from __future__ import annotations

import argparse
import logging
import os

from proxy.cli.database import check_url, open_ledger
from proxy.cli.errors import UsageError
from proxy.config import Settings

logger = logging.getLogger("spendgate")


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate serve`: the proxy, until it is stopped."""
    from proxy.ledger.alerts import notify_now
    from proxy.ledger.db import in_memory, upgrade
    from proxy.ledger.disk import replay_spilled
    from proxy.logs import configure_logging
    from proxy.serving import run

    settings = Settings.from_environ(
        os.environ, db_url=args.db, host=args.host, port=args.port, upstream_url=args.upstream, workers=args.workers
    )
    if settings.anthropic_api_key is None:
        raise UsageError(
            "ANTHROPIC_API_KEY is not set: spendgate forwards calls with your Anthropic API key, so set it "
            "(export ANTHROPIC_API_KEY=sk-ant-...) and start again."
        )
    configure_logging(settings.log_format)
    url = check_url(settings.db_url)
    if settings.workers > 1 and in_memory(url):
        raise UsageError(
            "--workers needs a ledger every worker can open: an in-memory SQLite database would be one per worker. "
            "Use a SQLite file or PostgreSQL."
        )
    _check_listenable(settings.host, settings.port, "--port (or SPENDGATE_PORT)")
    if settings.metrics_addr is not None:
        _check_listenable(*settings.metrics_addr, "SPENDGATE_METRICS_ADDR")
    upgrade(settings.db_url)
    with open_ledger(settings) as engine:
        # Records spilled at an earlier shutdown; the journals of gone processes are replayed by every serving
        # process as it starts (proxy/app.py), so a restarted worker replays its dead sibling's too.
        spilled = replay_spilled(engine, settings.spill_dir, name="replay", soft_fraction=settings.soft_limit_fraction)
    notify_now(settings.alert_webhook, spilled.crossed)
    logger.info(
        "spendgate serving on http://%s:%d with %d worker(s), forwarding to %s",
        settings.host,
        settings.port,
        settings.workers,
        settings.upstream_url,
    )
    run(settings)
    return 0


def _check_listenable(host: str, port: int, setting: str) -> None:
    """A one-line `UsageError` for an address `serve` could not listen on (most often a port another server holds,
    such as a `spendgate serve` already running): uvicorn would find out only after migrating and starting up,
    and say so in a log line among others. `setting` is what chooses another port."""
    import errno
    import socket

    # Bound the way uvicorn binds (SO_REUSEADDR: a port in TIME_WAIT is free, one listened on is not), then let go.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {host} is already in use (another `spendgate serve`?): stop that server, or "
                    f"choose another port with {setting}."
                ) from None
            raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror}") from None
