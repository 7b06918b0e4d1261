"""The OAuth endpoints command-line tools use (RFC 8628 device authorization, RFC 6749 token endpoint):

- `POST /oauth/device_authorization` starts a grant: a device code (the tool's secret), a user code and the page
  where its person approves it (`/device`);
- `POST /oauth/token` with `grant_type=urn:ietf:params:oauth:grant-type:device_code` polls it, and once approved
  answers with a personal key as the access token (`sk-sg-…`) and a refresh token;
- `POST /oauth/token` with `grant_type=refresh_token` trades a refresh token for a new key and refresh token,
  revoking the old key (what `spendgate key-helper` does before a key expires).

Errors are RFC 6749 section 5.2's JSON (`{"error": ..., "error_description": ...}`), as OAuth clients expect.
"""

from __future__ import annotations

from datetime import UTC, datetime

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import ledger_errors
from proxy.ledger.device_grants import poll, start_grant
from proxy.ledger.key_admin import NewKey, renew_key
from proxy.ledger.keys import KeyCache
from proxy.surfaces.sessions import read_form

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
DESCRIPTIONS = {
    "authorization_pending": "Waiting for the person to approve the code at the verification page.",
    "slow_down": "Polling too fast: wait longer between requests.",
    "access_denied": "The person denied this sign-in.",
    "expired_token": "This device code expired or was already used: start again with `spendgate login`.",
    "invalid_grant": "No such device code: start again with `spendgate login`.",
}
RENEWAL_REFUSED = (
    "This refresh token is unknown or used, its key revoked or expired, or its person no longer in the key's team "
    "or not signed in lately: sign in again with `spendgate login`."
)


def oauth_routes(public_url: str | None, *, interval: int) -> list[Route]:
    """The two endpoints; `interval` is how long a tool waits between polls, in seconds."""

    async def device_authorization(request: Request) -> Response:
        engine: Engine = request.state.engine
        address = request.client.host if request.client else "unknown"
        with ledger_errors():
            grant = await anyio.to_thread.run_sync(start_grant, engine, address)
        page = (public_url or str(request.base_url).rstrip("/")) + "/device"
        body = {
            "device_code": grant.device_code,
            "user_code": grant.user_code,
            "verification_uri": page,
            "verification_uri_complete": f"{page}?user_code={grant.user_code}",
            "expires_in": grant.expires_in,
            "interval": interval,
        }
        return JSONResponse(body, headers=NO_STORE)

    async def token(request: Request) -> Response:
        form = await read_form(request)
        engine: Engine = request.state.engine
        grant_type = form.get("grant_type", "")
        with ledger_errors():
            if grant_type == DEVICE_GRANT and form.get("device_code"):
                code = form["device_code"]
                outcome = await anyio.to_thread.run_sync(lambda: poll(engine, code, interval=interval))
                if isinstance(outcome, str):
                    return _error(outcome, DESCRIPTIONS[outcome])
                return _issued(outcome)
            if grant_type == "refresh_token" and form.get("refresh_token"):
                refresh = form["refresh_token"]
                renewed = await anyio.to_thread.run_sync(renew_key, engine, refresh)
                if renewed is None:
                    return _error("invalid_grant", RENEWAL_REFUSED)
                keys: KeyCache = request.state.keys
                keys.forget(renewed.replaces or "")
                return _issued(renewed)
        if grant_type not in (DEVICE_GRANT, "refresh_token"):
            return _error("unsupported_grant_type", f"grant_type must be {DEVICE_GRANT} or refresh_token.")
        return _error("invalid_request", "device_code (or refresh_token) is missing.")

    return [
        Route("/oauth/device_authorization", device_authorization, methods=["POST"]),
        Route("/oauth/token", token, methods=["POST"]),
    ]


def _issued(made: NewKey) -> Response:
    view = made.view
    expires_in = int((view.expires_at - datetime.now(UTC)).total_seconds()) if view.expires_at else None
    body = {
        "access_token": made.key,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "refresh_token": made.refresh_token,
        "key_id": view.id,
        "team": view.team,
        "key_owner": view.key_owner,
        "expires_at": view.expires_at.isoformat() if view.expires_at else None,
    }
    return JSONResponse(body, headers=NO_STORE)


def _error(code: str, description: str, *, status: int = 400) -> Response:
    return JSONResponse({"error": code, "error_description": description}, status_code=status, headers=NO_STORE)
