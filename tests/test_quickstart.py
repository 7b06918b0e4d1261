"""The README's quickstart, run literally: the commands a new user copies, against a fake Anthropic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.replicas import free_port
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_blocks() -> tuple[str, str]:
    """The shell and Python blocks of the README's "Five minutes" section."""
    section = README.read_text().split("## Five minutes with spendgate", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert shell and python
    return shell.group(1), python.group(1)


def test_the_readme_quickstart_works_as_written(tmp_path: Path) -> None:
    shell, python = quickstart_blocks()
    placeholder = re.search(r"ANTHROPIC_API_KEY=(\S+)", shell)
    assert placeholder
    # The user's installed console script, where the README's first command puts it.
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "spendgate").symlink_to(Path(sys.executable).parent / "spendgate")
    port = free_port()
    upstream = FakeAnthropic(key=placeholder.group(1))
    with serve_in_thread(upstream) as upstream_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "ANTHROPIC_"))}
        env.update(SPENDGATE_UPSTREAM_URL=upstream_url, SPENDGATE_PORT=str(port))
        # Output to files, not pipes: the backgrounded `serve` keeps its copy open long after the shell exits.
        out, err = tmp_path / "out.txt", tmp_path / "err.txt"
        with out.open("w") as stdout, err.open("w") as stderr:
            ran = subprocess.run(
                ["bash", "-ec", shell + '\necho "serve-pid: $!"'],
                cwd=tmp_path,
                env=env,
                stdout=stdout,
                stderr=stderr,
                timeout=120,
            )
        assert ran.returncode == 0, err.read_text()
        printed = out.read_text()
        serve_pid = int(printed.rsplit("serve-pid: ", 1)[1])
        try:
            [key] = [line for line in printed.splitlines() if line.startswith("sk-sg-")]
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _healthy(url), "spendgate serve to answer")
            client = python.replace("http://127.0.0.1:8080", url).replace("sk-sg-…", key)
            called = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=60)
            assert called.returncode == 0, called.stderr
        finally:
            os.kill(serve_pid, signal.SIGTERM)
            wait_until(lambda: not _alive(serve_pid), "spendgate serve to exit")
    assert [(r.method, r.path) for r in upstream.requests] == [("POST", "/v1/messages")]
    usage = subprocess.run(
        [str(tmp_path / ".venv" / "bin" / "spendgate"), "usage"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert usage.returncode == 0 and len(usage.stdout.splitlines()) == 1


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the shell that is gone) counts as exited.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
