"""`spendgate serve` as real processes, the way replicas run in production."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.upstream import UPSTREAM_KEY
from tests.waiting import wait_until


def free_port() -> int:
    """A loopback port nobody listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def replica(
    db_url: str,
    upstream_url: str,
    workdir: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    port: int | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `spendgate serve` in a child process (in `cwd`, default this one, with `env` added to the environment,
    `preexec_fn` run in the child before it starts, e.g. to lower its limits) until the block ends; yields its URL
    and process. `port`: where it listens (default: a free one)."""
    port = port or free_port()
    log = workdir / f"serve-{port}.log"
    environ = {
        **os.environ,
        "SPENDGATE_DB_URL": db_url,
        "ANTHROPIC_API_KEY": UPSTREAM_KEY,
        "SPENDGATE_SPILL_DIR": str(workdir / "spill"),
        **(env or {}),
    }
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--upstream", upstream_url],
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"spendgate serve exited early:\n{log.read_text()}")
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, "spendgate serve to answer /healthz", timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{log.read_text()}") from None


@contextlib.contextmanager
def replicas(
    db_url: str, upstream_url: str, workdir: Path, count: int, env: dict[str, str] | None = None
) -> Iterator[list[str]]:
    """Several replicas on one ledger (`env` added to their environment); yields their URLs."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(replica(db_url, upstream_url, workdir, env=env))[0] for _ in range(count)]
