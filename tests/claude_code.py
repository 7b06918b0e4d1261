"""The real Claude Code (the CLI tests/clients pins) run through spendgate, in print mode, on loopback only.

`claude_code_stack(...)` is `tests.stack.running_stack` (team `research`, one key, the fake upstream) with an ear on
spendgate's own port: what Claude Code asked spendgate and what it was answered, including what never reaches the
upstream (the `HEAD /` probe, a refusal). `ClaudeCodeStack.run(prompt)` runs the CLI against it with a fresh HOME and
the stack's key, and returns what it printed:

```python
with claude_code_stack(engine, db_url, tmp_path, team=TeamSettings(budget_usd=Decimal("0.000001"))) as stack:
    ran = stack.run("say hi", model="claude-sonnet-4-6")
    assert ran.returncode != 0 and "402" in ran.output
```
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.app import create_app
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from tests.servers import serve_in_thread
from tests.stack import Stack, settings_for
from tests.upstream import FakeAnthropic

CLIENTS = Path(__file__).resolve().parent / "clients"
# Claude Code calls nothing but the API it is pointed at (no telemetry, no update checks: the sandbox is offline).
CLAUDE_CODE_QUIET = {
    "DISABLE_TELEMETRY": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
}
# Model discovery is nonessential traffic to Claude Code: with it on, the other kinds are turned off one by one.
CLAUDE_CODE_DISCOVERING = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
}
# The models Claude Code took from discovery, under its HOME.
DISCOVERED = Path(".claude") / "cache" / "gateway-models.json"


def claude_code() -> Path:
    """The Claude Code CLI the tests pin (tests/clients/package.json)."""
    found = CLIENTS / "node_modules" / ".bin" / "claude"
    assert found.exists(), "Claude Code is not installed: run `npm ci --prefix tests/clients` (.ci/run does it)"
    return found


@dataclass
class Heard:
    """One request spendgate received, and its answer."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int | None = None
    body: bytes = b""

    def json(self) -> Any:
        """The answer's body as JSON."""
        return json.loads(self.body)


class Ear:
    """An ASGI app in front of spendgate that keeps every request and answer (`heard`, in arrival order)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self.heard: list[Heard] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        heard = Heard(scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers)
        self.heard.append(heard)

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                heard.status = message["status"]
            elif message["type"] == "http.response.body":
                heard.body += message.get("body", b"")
            await send(message)

        await self._app(scope, receive, answer)


@dataclass(frozen=True)
class Ran:
    """One Claude Code run: its exit status, what it printed, and its HOME."""

    returncode: int
    stdout: str
    stderr: str
    home: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def discovered(self) -> list[str] | None:
        """The model ids Claude Code kept from model discovery (None: it kept none)."""
        cache = self.home / DISCOVERED
        if not cache.exists():
            return None
        return [model["id"] for model in json.loads(cache.read_text())["models"]]


@dataclass
class ClaudeCodeStack(Stack):
    """A `Stack` that heard everything sent to spendgate, and runs Claude Code against it."""

    heard: list[Heard] = field(default_factory=list)
    workdir: Path = Path()
    _runs: Iterator[int] = field(default_factory=itertools.count)

    def run(
        self,
        prompt: str = "say hi",
        *,
        model: str | None = None,
        discovery: bool = False,
        env: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Ran:
        """Run `claude -p PROMPT` through spendgate with the stack's key as `ANTHROPIC_AUTH_TOKEN` (`env` may set
        `ANTHROPIC_API_KEY` instead, or anything else); `discovery`: with gateway model discovery on."""
        home = self.workdir / f"claude-{next(self._runs)}"
        home.mkdir(parents=True)
        # Nothing of the environment the tests run in (a developer's own Claude Code, its key) leaks into the run.
        inherited = {name: value for name, value in os.environ.items() if not name.startswith(("ANTHROPIC", "CLAUDE"))}
        environment = {
            **inherited,
            **(CLAUDE_CODE_DISCOVERING if discovery else CLAUDE_CODE_QUIET),
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_AUTH_TOKEN": self.key,
            **(env or {}),
        }
        command = [str(claude_code()), "-p", prompt, "--settings", json.dumps(settings or {})]
        if model is not None:
            command += ["--model", model]
        done = subprocess.run(command, env=environment, cwd=home, capture_output=True, text=True, timeout=120)
        return Ran(done.returncode, done.stdout, done.stderr, home)


@contextlib.contextmanager
def claude_code_stack(
    engine: Engine, db_url: str, tmp_path: Path, *, team: TeamSettings | None = None, **overrides: Any
) -> Iterator[ClaudeCodeStack]:
    """Team `research` (with `team`'s settings) and one key, the fake upstream, and spendgate (with `overrides` to
    its settings) in front of it, heard."""
    create_team(engine, "research", team or TeamSettings(), actor="test")
    view, key = create_key(engine, "research", actor="test", name="claude-code")
    upstream = FakeAnthropic()
    with serve_in_thread(upstream) as upstream_url:
        ear = Ear(create_app(settings_for(db_url, upstream_url, tmp_path, **overrides)))
        with serve_in_thread(ear) as url:
            yield ClaudeCodeStack(
                url=url,
                key=key,
                key_id=view.id,
                upstream=upstream,
                upstream_url=upstream_url,
                engine=engine,
                heard=ear.heard,
                workdir=tmp_path / "claude-code",
            )
