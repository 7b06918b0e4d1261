"""The README's quickstart, run literally: the commands a new user copies, against a fake Anthropic."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.replicas import free_port
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def first_command() -> str:
    """The first of the README's "Two commands", which installs spendgate and runs `spendgate serve`."""
    section = README.read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block
    return block.group(1).strip()


def quickstart_blocks() -> tuple[str, str]:
    """The shell and Python blocks of the README's "Five minutes" section."""
    section = README.read_text().split("## Five minutes with spendgate", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert shell and python
    return shell.group(1), python.group(1)


def test_the_readme_quickstart_works_as_written(tmp_path: Path) -> None:
    # What the first command runs once the package is installed: the server, in the foreground.
    serve = first_command().rsplit("&& ", 1)[1]
    shell, python = quickstart_blocks()
    # The quickstart's commands run beside that server, on its port: one more `serve` there could only fail.
    assert "spendgate serve" in serve and "serve" not in shell
    placeholder = re.search(r"ANTHROPIC_API_KEY=(\S+)", serve)
    assert placeholder
    # The user's clone: the console script where the first command puts it, and the repository's .gitignore.
    project, logs = tmp_path / "spendgate", tmp_path / "logs"
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / ".venv" / "bin" / "spendgate").symlink_to(Path(sys.executable).parent / "spendgate")
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    logs.mkdir()
    port = free_port()
    upstream = FakeAnthropic(key=placeholder.group(1))
    with serve_in_thread(upstream) as upstream_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "ANTHROPIC_"))}
        env.update(SPENDGATE_UPSTREAM_URL=upstream_url, SPENDGATE_PORT=str(port))
        # Its log goes to files: a pipe nobody reads while it runs would fill up and stall it. `exec env` makes the
        # server this very process (so SIGTERM reaches it) and applies the command's `VAR=value` prefix.
        with (logs / "serve.out").open("w") as stdout, (logs / "serve.err").open("w") as stderr:
            server = subprocess.Popen(
                ["bash", "-ec", f"exec env {serve}"], cwd=project, env=env, stdout=stdout, stderr=stderr
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _healthy(url) or server.poll() is not None, "spendgate serve to answer")
            assert server.poll() is None, (logs / "serve.err").read_text()
            # "In a second terminal": the quickstart's commands, while the server runs.
            ran = subprocess.run(
                ["bash", "-ec", shell], cwd=project, env=env, capture_output=True, text=True, timeout=120
            )
            assert ran.returncode == 0, ran.stderr
            [key] = [line for line in ran.stdout.splitlines() if line.startswith("sk-sg-")]
            client = python.replace("http://127.0.0.1:8080", url).replace("sk-sg-…", key)
            called = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=60)
            assert called.returncode == 0, called.stderr
            # Who starts a second server on the port the first one holds is told so in one line, before anything
            # is touched.
            second = subprocess.run(
                [".venv/bin/spendgate", "serve"],
                cwd=project,
                env={**env, "ANTHROPIC_API_KEY": placeholder.group(1)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
            assert f"port {port}" in second.stderr and "already in use" in second.stderr
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert [(r.method, r.path) for r in upstream.requests] == [("POST", "/v1/messages")]
    usage = subprocess.run(
        [".venv/bin/spendgate", "usage"], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 0 and len(usage.stdout.splitlines()) == 1
    # Everything spendgate wrote in the clone (ledger, lock files, spill folder) is ignored by git.
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=project, capture_output=True, text=True
    )
    assert status.stdout.splitlines() == ["?? .gitignore"], status.stdout


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False
