"""A real OpenID Connect provider on loopback for sign-in tests: panva's `oidc-provider` under Node.

`running_idp` starts `tests/idp/provider.mjs` (which needs `npm ci --prefix tests/idp` once; `.ci/run` does it) with
the clients and accounts a test gives it, and yields its issuer URL. The provider runs the authorization code flow
with PKCE (S256) required, signs id_tokens RS256 and puts the account's email, email_verified, name and groups in
them. Its sign-in page is oidc-provider's development page: `sign_in_at_idp` fills it in as a browser user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Page

from tests.waiting import wait_until

IDP_DIR = Path(__file__).resolve().parent / "idp"
PROVIDER = IDP_DIR / "provider.mjs"
NPM_HINT = "run `npm ci --prefix tests/idp` (.ci/run does it; it needs Node.js >= 20.18 and npm)"
STOP_SECONDS = 10.0


@dataclass(frozen=True)
class IdpClient:
    """A relying party registered at the IdP (a confidential web client of the code flow)."""

    client_id: str
    client_secret: str
    redirect_uris: list[str]
    # How the client authenticates at the token endpoint: oidc-provider holds each client to the one registered.
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"


@dataclass(frozen=True)
class IdpAccount:
    """An account at the IdP; its key in `running_idp`'s `accounts` is both its `sub` and the login name to type."""

    email: str
    name: str
    groups: list[str] = field(default_factory=list)
    email_verified: bool = True


class _Lines:
    """The lines a process writes to a pipe, read in a thread (the pipe is drained until it closes)."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))
        self.closed = True

    def join(self) -> None:
        self._thread.join(timeout=STOP_SECONDS)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


@contextlib.contextmanager
def running_idp(tmp_path: Path, *, clients: list[IdpClient], accounts: dict[str, IdpAccount]) -> Iterator[str]:
    """Run the IdP on a free loopback port with these clients and accounts; yields its issuer (`http://127.0.0.1:N`,
    no trailing slash) once its discovery document answers, and stops it on exit. Its log (stderr) is
    `tmp_path/idp.log`."""
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"the test IdP's npm packages are not installed in {IDP_DIR / 'node_modules'}: {NPM_HINT}")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(f"the test IdP needs Node.js (`node` is not on PATH): {NPM_HINT}")

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "idp-config.json"
    config.write_text(
        json.dumps(
            {
                "clients": [asdict(client) for client in clients],
                "accounts": {sub: asdict(account) for sub, account in accounts.items()},
            },
            indent=2,
        )
    )
    log_path = tmp_path / "idp.log"
    # Port 0: the provider listens on a port the OS picks (no window in which another process can take it) and
    # announces its issuer on its one line of stdout.
    env = {**os.environ, "IDP_PORT": "0", "IDP_CONFIG": str(config), "NODE_ENV": "test"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [node, str(PROVIDER)], cwd=IDP_DIR, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    assert process.stdout is not None
    stdout = _Lines(process.stdout)
    try:

        def announced() -> str:
            for line in stdout.lines:
                if line.startswith("READY "):
                    return line.removeprefix("READY ")
            if stdout.closed or process.poll() is not None:
                raise RuntimeError(
                    f"the test IdP exited ({process.poll()}) before it was ready; its log:\n{log_path.read_text()}"
                )
            return ""

        try:
            issuer = wait_until(announced, "the test IdP to announce its issuer")
        except AssertionError as error:
            raise AssertionError(f"{error}; its log:\n{log_path.read_text()}") from None

        def discovery_answers() -> bool:
            try:
                response = httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=5)
            except httpx.TransportError:
                return False
            return response.status_code == 200 and response.json().get("issuer") == issuer

        wait_until(discovery_answers, "the test IdP's discovery document")
        yield issuer
    finally:
        _stop(process)
        # The pipe is at its end once the process is gone: the reader finishes before the pipe is closed.
        stdout.join()
        process.stdout.close()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def sign_in_at_idp(page: Page, login: str) -> None:
    """On the IdP's sign-in page (where a relying party has just sent the browser), sign in as `login` (with any
    password: these are oidc-provider's development pages) and grant consent if asked; returns once the browser has
    left the IdP for the relying party's redirect_uri (not waiting for that page to load).

    Fails if the IdP keeps the browser: a login name that is no account of the IdP's (it shows its sign-in page
    again), or an error page.

    The pages (oidc-provider's devInteractions): sign-in is `form:has(input[name=prompt][value=login])` with
    `input[name=login]`, `input[name=password]` and `button[type=submit]`; consent (only shown when the client asks
    with prompt=consent) is `form:has(input[name=prompt][value=consent])` with its `button[type=submit]`
    ("Continue"). Both have a "[ Cancel ]" link (`.login-help a`) that sends access_denied to the relying party."""
    idp = _origin(page.url)
    form = page.locator("form:has(input[name=prompt][value=login])")
    form.locator("input[name=login]").fill(login)
    form.locator("input[name=password]").fill("any password")
    with page.expect_navigation(wait_until="commit"):
        form.locator("button[type=submit]").click()
    if _origin(page.url) != idp:
        return
    page.wait_for_load_state("domcontentloaded")
    if "unknown_login=" in urlsplit(page.url).query:
        raise AssertionError(f"the IdP has no account {login!r}: it showed its sign-in page again ({page.url})")
    consent = page.locator("form:has(input[name=prompt][value=consent]) button[type=submit]")
    if consent.count() == 0:
        raise AssertionError(f"signing in as {login!r} at the IdP ended at {page.url}:\n{page.inner_text('body')}")
    with page.expect_navigation(wait_until="commit"):
        consent.click()
    if _origin(page.url) == idp:
        raise AssertionError(f"consenting at the IdP ended at {page.url}:\n{page.inner_text('body')}")
