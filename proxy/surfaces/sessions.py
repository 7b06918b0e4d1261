"""What every surface a browser uses shares: the session cookie, the principal behind it, and CSRF checks.

The cookie holds a random session id (the ledger keeps its hash: proxy/ledger/web_sessions.py). It is HttpOnly,
SameSite=Lax (the provider's redirect back to the callback is a cross-site navigation, which a Strict cookie would
not survive) and Secure whenever spendgate is reached over https. Lax still sends the cookie on a cross-site
top-level GET, so nothing is changed by a GET: every change is a POST carrying the session's CSRF token, as a form
field or, for the admin API, the `x-spendgate-csrf` header.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs

import anyio.to_thread
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response

from proxy.identity.roles import Principal, principal_of
from proxy.ledger.web_sessions import SESSION_SECONDS

COOKIE = "spendgate_session"
CSRF_HEADER = "x-spendgate-csrf"
MAX_FORM_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Access:
    """How this server recognizes signed-in browsers."""

    admin_token: str | None
    admin_groups: frozenset[str]
    # Behind a TLS-terminating proxy the request itself is http: SPENDGATE_PUBLIC_URL says https.
    public_url: str | None = None

    async def principal(self, request: Request) -> Principal | None:
        """Who this request's session cookie stands for (None: nobody signed in)."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        engine: Engine = request.state.engine
        return await anyio.to_thread.run_sync(
            lambda: principal_of(engine, cookie, admin_token=self.admin_token, admin_groups=self.admin_groups)
        )

    def set_cookie(self, request: Request, response: Response, session_id: str) -> None:
        """Hand the browser its new session."""
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=SESSION_SECONDS,
            path="/",
            secure=self.secure(request),
            httponly=True,
            samesite="lax",
        )

    def clear_cookie(self, request: Request, response: Response) -> None:
        """Make the browser forget its session."""
        response.delete_cookie(COOKIE, path="/", secure=self.secure(request), httponly=True, samesite="lax")

    def secure(self, request: Request) -> bool:
        """Whether cookies must be Secure: the browser reaches us over https."""
        return request.url.scheme == "https" or (self.public_url or "").startswith("https://")


def csrf_matches(principal: Principal, given: str | None) -> bool:
    """Whether `given` is the session's CSRF token (in constant time)."""
    return bool(given) and hmac.compare_digest(str(given).encode("utf-8", "replace"), principal.csrf.encode())


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form of at most `MAX_FORM_BYTES` (the rest is ignored), one value per field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            break
    fields = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}
