"""Signing in and out of the dashboard: with the identity provider (OpenID Connect), or with the admin token (the
break-glass way in, rate limited per client address).

A sign-in with the provider leaves with a fresh `state` (kept hashed in the ledger, bound to this browser by a
short-lived cookie), `nonce` and PKCE verifier, and comes back to `/dashboard/oidc/callback`, which takes the state
(a replay finds nothing), checks the id_token (proxy/identity/oidc.py) and only then makes a new session. Where the
person goes afterwards is a path on this server, never a URL a request can point elsewhere.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.errors import ledger_errors
from proxy.identity.oidc import OidcClient, SignInFailed, new_verifier
from proxy.ledger.people import record_sign_in
from proxy.ledger.web_sessions import (
    ADMIN_TOKEN_ACTOR,
    SIGN_IN_SECONDS,
    PendingSignIn,
    begin_sign_in,
    end_session,
    start_session,
    take_sign_in,
)
from proxy.surfaces.sessions import COOKIE, Access, csrf_matches, read_form

# The cookie that binds a sign-in under way to the browser that started it (login CSRF: a callback URL sent to
# someone else's browser finds no matching cookie there).
STATE_COOKIE = "spendgate_sign_in"
STATE_PATH = "/dashboard/oidc"
# Sign-in attempts per client address: a burst of this many, then one more every `REFILL_SECONDS`.
ATTEMPTS = 5
REFILL_SECONDS = 12.0
# Addresses remembered at most; the least recently seen are forgotten first.
MAX_CLIENTS = 10_000
# Where a signed-in person may be sent back to.
RETURN_PREFIXES = ("/dashboard", "/device")

Render = Callable[..., str]


class SignInLimiter:
    """A token bucket of sign-in attempts per client address."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def attempt(self, client: str, now: float) -> float:
        """Take one attempt for `client`; 0 when allowed, else the seconds until the next one is."""
        tokens, last = self._buckets.pop(client, (float(ATTEMPTS), now))
        tokens = min(float(ATTEMPTS), tokens + (now - last) / REFILL_SECONDS)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) * REFILL_SECONDS
        self._buckets[client] = (tokens - 1, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return 0.0


def safe_return(raw: str | None) -> str:
    """`raw` if it is a path on this dashboard (or the device page), else the dashboard: never another host, nor
    a path a browser would read as one (`//host`, `/\\host`), nor one that dot segments take elsewhere."""
    if not raw or len(raw) > 2000 or any(ch in raw for ch in "\\\r\n\t\x00") or raw.startswith("//"):
        return "/dashboard"
    parts = urlsplit(raw)
    if (
        parts.scheme
        or parts.netloc
        or {".", ".."} & set(unquote(parts.path).split("/"))
        or not any(parts.path == prefix or parts.path.startswith(prefix + "/") for prefix in RETURN_PREFIXES)
    ):
        return "/dashboard"
    return raw


def sign_in_routes(access: Access, oidc: OidcClient | None, render: Render) -> list[Route]:
    """`/dashboard/sign-in` (form and admin token), `/dashboard/login/oidc`, the callback, `/dashboard/sign-out`."""
    limiter = SignInLimiter()

    def page(request: Request, *, error: str | None = None, status: int = 200) -> Response:
        following = safe_return(request.query_params.get("next"))
        html = render(
            "sign_in.html",
            error=error,
            oidc=oidc is not None,
            token=access.admin_token is not None,
            next=quote(following, safe="/"),
        )
        return HTMLResponse(html, status_code=status)

    async def sign_in_form(request: Request) -> Response:
        return page(request)

    async def sign_in_with_token(request: Request) -> Response:
        if access.admin_token is None:
            return page(request, error="Sign in with your identity provider.", status=404)
        client = request.client.host if request.client else "unknown"
        wait = limiter.attempt(client, time.monotonic())
        if wait:
            answer = page(request, error=f"Too many attempts. Try again in {wait:.0f} seconds.", status=429)
            answer.headers["retry-after"] = str(int(wait) + 1)
            return answer
        token = (await read_form(request)).get("token", "")
        if not hmac.compare_digest(token.encode("utf-8", "replace"), access.admin_token.encode()):
            return page(request, error="That is not the admin token.", status=401)
        engine: Engine = request.state.engine
        previous = request.cookies.get(COOKIE)
        session = await anyio.to_thread.run_sync(
            lambda: start_session(engine, ADMIN_TOKEN_ACTOR, admin_token=access.admin_token, replaces=previous)
        )
        answer = RedirectResponse("/dashboard", status_code=303)
        access.set_cookie(request, answer, session)
        return answer

    async def start_oidc(request: Request) -> Response:
        if oidc is None:
            return page(request, error="Sign-in with an identity provider is not set up here.", status=404)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), new_verifier()
        pending = PendingSignIn(nonce=nonce, verifier=verifier, return_to=safe_return(request.query_params.get("next")))
        try:
            target = await oidc.authorization_url(state=state, nonce=nonce, verifier=verifier)
        except SignInFailed as error:
            return page(request, error=str(error), status=502)
        engine: Engine = request.state.engine
        with ledger_errors():
            await anyio.to_thread.run_sync(begin_sign_in, engine, state, pending)
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(
            STATE_COOKIE,
            state,
            max_age=SIGN_IN_SECONDS,
            path=STATE_PATH,
            secure=access.secure(request),
            httponly=True,
            samesite="lax",
        )
        return answer

    async def callback(request: Request) -> Response:
        if oidc is None:
            return page(request, error="Sign-in with an identity provider is not set up here.", status=404)
        query = request.query_params
        state, bound = query.get("state", ""), request.cookies.get(STATE_COOKIE, "")
        if query.get("error"):
            return _failed(access, request, page, f"The identity provider said: {query['error'][:100]}.")
        if not state or not hmac.compare_digest(state.encode("utf-8", "replace"), bound.encode("utf-8", "replace")):
            return _failed(access, request, page, "This sign-in did not start in this browser. Start again.")
        engine: Engine = request.state.engine
        pending = await anyio.to_thread.run_sync(take_sign_in, engine, state)
        if pending is None or not query.get("code"):
            return _failed(access, request, page, "This sign-in expired or was already used. Start again.")
        try:
            person = await oidc.sign_in(query["code"], nonce=pending.nonce, verifier=pending.verifier)
        except SignInFailed as error:
            return _failed(access, request, page, str(error))
        previous = request.cookies.get(COOKIE)

        def remember() -> str:
            record_sign_in(engine, person)
            return start_session(engine, person.subject, replaces=previous)

        with ledger_errors():
            session = await anyio.to_thread.run_sync(remember)
        answer = RedirectResponse(pending.return_to, status_code=303)
        answer.delete_cookie(STATE_COOKIE, path=STATE_PATH)
        access.set_cookie(request, answer, session)
        return answer

    async def sign_out(request: Request) -> Response:
        principal = await access.principal(request)
        form = await read_form(request)
        if principal is not None and not csrf_matches(principal, form.get("csrf")):
            return HTMLResponse(render("problem.html", title="Forbidden", message="Stale form: reload."), 403)
        cookie = request.cookies.get(COOKIE)
        if cookie:
            engine: Engine = request.state.engine
            await anyio.to_thread.run_sync(end_session, engine, cookie)
        answer = RedirectResponse("/dashboard/sign-in", status_code=303)
        access.clear_cookie(request, answer)
        return answer

    return [
        Route("/dashboard/sign-in", sign_in_form, methods=["GET"]),
        Route("/dashboard/sign-in", sign_in_with_token, methods=["POST"]),
        Route("/dashboard/login/oidc", start_oidc, methods=["GET"]),
        Route("/dashboard/oidc/callback", callback, methods=["GET"]),
        Route("/dashboard/sign-out", sign_out, methods=["POST"]),
    ]


def _failed(access: Access, request: Request, page: Callable[..., Response], message: str) -> Response:
    answer = page(request, error=f"Sign-in failed: {message}", status=400)
    answer.delete_cookie(STATE_COOKIE, path=STATE_PATH)
    return answer
