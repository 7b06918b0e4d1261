"""`spendgate login` and `spendgate key-helper`: a person's key for command-line tools, without copying one.

`login` runs the device authorization grant (RFC 8628) against a spendgate server: it shows a code and a link, the
person approves it in the browser after signing in, and it stores the personal key and its refresh token in a file
only its owner can read (mode 0600). It prints nothing secret.

`key-helper` prints a valid key from that file, alone on stdout, first trading the refresh token for a new key when
the stored one is about to expire: what Claude Code's `apiKeyHelper` setting runs. Two helpers running at once
(several Claude Code sessions) take turns on a lock beside the file, so only one of them renews.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.cli.errors import UsageError
from proxy.config import Settings

if TYPE_CHECKING:
    import httpx

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "spendgate-cli"
# A key is renewed when less than this is left of it (or less than half its lifetime, for short-lived keys).
RENEW_BEFORE = timedelta(days=7)
HTTP_TIMEOUT_SECONDS = 30.0


def credentials_path() -> Path:
    """Where the personal key is kept: `SPENDGATE_CREDENTIALS`, else the user's config folder."""
    chosen = os.environ.get("SPENDGATE_CREDENTIALS")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spendgate" / "credentials.json"


def run_login(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate login --url URL`."""
    url = args.url.rstrip("/")
    parts = urlsplit(url)
    # The key and its refresh token come back in the answer: over plain http only on this machine.
    if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname))):
        raise UsageError(
            f"--url {args.url!r} is not a spendgate address over https (https://spendgate.example.com; "
            "http only on this machine)"
        )
    import httpx  # here, not above: every other command starts without it

    with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as http:
        started = _oauth(http, f"{url}/oauth/device_authorization", {"client_id": CLIENT_ID})
        print(f"To sign in, open {started['verification_uri']} and enter the code {started['user_code']}", flush=True)
        print(f"(or open {started['verification_uri_complete']})", flush=True)
        interval = max(1, int(started.get("interval", 5)))
        deadline = time.monotonic() + int(started.get("expires_in", 600))
        while time.monotonic() < deadline:
            time.sleep(interval)
            answer = http.post(
                f"{url}/oauth/token",
                data={"grant_type": DEVICE_GRANT, "device_code": started["device_code"], "client_id": CLIENT_ID},
            )
            body = _body(answer)
            error = body.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5
                continue
            if answer.status_code != 200 or error:
                raise UsageError(f"sign-in failed: {body.get('error_description') or error or answer.status_code}")
            path = _store(url, body)
            print(
                f"Signed in as {body['key_owner']}: key {body['key_id']} for team {body['team']}, "
                f"expires {body['expires_at'] or 'never'}; stored in {path}"
            )
            return 0
    raise UsageError("the code expired before it was approved; run `spendgate login` again")


def run_key_helper(args: argparse.Namespace, settings: Settings) -> int:
    """`spendgate key-helper`: print a valid personal key, renewing it first when it is about to expire."""
    import httpx  # here, not above: every other command starts without it

    path = credentials_path()
    with _locked(path):
        stored = _load(path)
        if _due(stored, args.renew_before):
            try:
                with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as http:
                    renewed = _oauth(
                        http,
                        f"{stored['url']}/oauth/token",
                        {
                            "grant_type": "refresh_token",
                            "refresh_token": stored["refresh_token"],
                            "client_id": CLIENT_ID,
                        },
                    )
                _store(stored["url"], renewed)
                stored = _load(path)
            except (httpx.HTTPError, UsageError) as error:
                if _expired(stored):
                    raise UsageError(
                        f"the stored key expired and could not be renewed ({error}); run `spendgate login`"
                    ) from None
                # Still valid: a server that is down now may answer at the next call.
                print(f"spendgate: could not renew the key yet ({error}); it still works", file=sys.stderr)
    print(stored["key"])
    return 0


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _oauth(http: httpx.Client, url: str, form: dict[str, str]) -> dict[str, Any]:
    answer = http.post(url, data=form)
    body = _body(answer)
    if answer.status_code != 200:
        reason = body.get("error_description") or body.get("error") or f"HTTP {answer.status_code}"
        raise UsageError(f"{url} refused: {reason}")
    return body


def _body(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _store(url: str, token: dict[str, Any]) -> Path:
    """Write the key file atomically, readable by its owner only, from its first byte."""
    path = credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = {
        "url": url,
        "key": token["access_token"],
        "refresh_token": token.get("refresh_token"),
        "key_id": token.get("key_id"),
        "team": token.get("team"),
        "key_owner": token.get("key_owner"),
        "expires_at": token.get("expires_at"),
        "issued_at": datetime.now(UTC).isoformat(),
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(kept, out, indent=2)
    os.replace(partial, path)
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no stored key at {path}: run `spendgate login --url URL` first") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("key"), str):
        raise UsageError(f"{path} holds no key: run `spendgate login --url URL` again")
    return stored


def _due(stored: dict[str, Any], renew_before: float | None) -> bool:
    expires = _instant(stored.get("expires_at"))
    if expires is None or not stored.get("refresh_token"):
        return False
    issued = _instant(stored.get("issued_at")) or datetime.now(UTC)
    margin = timedelta(seconds=renew_before) if renew_before is not None else min(RENEW_BEFORE, (expires - issued) / 2)
    return expires - datetime.now(UTC) <= margin


def _expired(stored: dict[str, Any]) -> bool:
    expires = _instant(stored.get("expires_at"))
    return expires is not None and expires <= datetime.now(UTC)


def _instant(raw: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(raw)) if raw else None
    except ValueError:
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
