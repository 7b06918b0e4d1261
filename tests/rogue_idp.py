"""A tiny OpenID provider for attack tests: it answers the token request with whatever id_token the test chose.

    with running_rogue_idp(client_id="dashboard") as rogue:
        rogue.answer_with(lambda authorize: rogue.claims_for(authorize, groups=["admins"]), signing=HS256(secret))
        ...  # the relying party signs in at rogue.issuer; its /token request gets that id_token

Its /authorize redirects at once (no sign-in page) to the redirect_uri with a fresh code and the state it was given,
and records its query (`rogue.authorize_requests`): the nonce the relying party sent is there, for the claims. Its
/token answers with the id_token built, at that moment, from what `answer_with` set (claims, or a function of the
/authorize query of the code; and how to sign them), and records the request (`rogue.token_requests`). Until
`answer_with` is called it answers like an honest provider: `claims_for` the /authorize query, RS256 with its key.
It checks no client authentication and no PKCE verifier (the token requests are recorded for a test to check).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.servers import serve_in_thread

Claims = dict[str, Any]
# The /authorize query (parameter -> value) of the code being exchanged.
Authorize = Mapping[str, str]


@dataclass(frozen=True)
class RS256:
    """RS256 with the provider's published key (`published=True`: the key in /jwks, a valid signature), or with a
    key it never published (`published=False`) under the same `kid`, so a relying party finds the published key by
    kid and must reject the signature."""

    published: bool = True


@dataclass(frozen=True)
class HS256:
    """HS256 with a shared secret: the client's own secret, or the issuer's public key as PEM text (the HS/RS
    confusion: an RP that verifies with whatever key material it has, for whatever alg the header names). Signed by
    hand with hmac: a careful JOSE library refuses a public key as an HMAC secret, which is exactly the point."""

    secret: str


@dataclass(frozen=True)
class NoSignature:
    """`alg: none`: header `{"alg":"none"}`, the payload, and an empty signature, built by hand."""


Signing = RS256 | HS256 | NoSignature
ClaimsSource = Mapping[str, Any] | Callable[[Authorize], Mapping[str, Any]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: Mapping[str, Any]) -> str:
    """An `alg: none` JWT: base64url(header) "." base64url(payload) "." (empty signature)."""
    header = b64url(json.dumps({"alg": "none"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    return f"{header}.{payload}."


def token_header(token: str) -> dict[str, Any]:
    """The decoded (unverified) header of a compact JWT."""
    segment = token.split(".")[0]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return header


class RogueIdp:
    """The provider's state: what the test set, and what the relying party sent. `issuer` is its loopback URL."""

    def __init__(self, *, client_id: str, sub: str, email: str, name: str, groups: list[str]) -> None:
        self.issuer = ""
        self.client_id = client_id
        self.sub = sub
        self.email = email
        self.name = name
        self.groups = groups
        self.kid = secrets.token_urlsafe(8)
        self.key = RSAKey.generate_key(2048, parameters={"kid": self.kid, "alg": "RS256", "use": "sig"})
        # Never published: signs RS256(published=False) tokens under the published key's kid.
        self.unpublished_key = RSAKey.generate_key(2048, parameters={"kid": self.kid})
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, Any]] = []
        self._codes: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._claims: ClaimsSource = self.claims_for
        self._signing: Signing = RS256()

    @property
    def jwks(self) -> dict[str, Any]:
        """The published key set (public parts)."""
        return dict(KeySet([self.key]).as_dict(private=False))

    @property
    def last_authorize(self) -> dict[str, str]:
        """The query of the latest /authorize request (fails if there was none)."""
        with self._lock:
            assert self.authorize_requests, "the relying party has not called the rogue IdP's /authorize"
            return self.authorize_requests[-1]

    def claims_for(self, authorize: Authorize, **overrides: Any) -> Claims:
        """Claims an honest provider would issue for this /authorize query (iss, aud, sub, nonce, iat, exp, the
        account's email, email_verified, name and groups), with `overrides` applied (a value of None drops it)."""
        now = int(time.time())
        claims: Claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": self.sub,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            "email": self.email,
            "email_verified": True,
            "name": self.name,
            "groups": list(self.groups),
        }
        if "nonce" in authorize:
            claims["nonce"] = authorize["nonce"]
        claims.update(overrides)
        return {key: value for key, value in claims.items() if value is not None}

    def answer_with(self, claims: ClaimsSource | None = None, *, signing: Signing | None = None) -> None:
        """What the next /token answers (and every one after, until set again): an id_token of `claims` (a mapping,
        or a function of the /authorize query of the code being exchanged; default: `claims_for` it), signed as
        `signing` says (default: RS256 with the published key)."""
        with self._lock:
            self._claims = self.claims_for if claims is None else claims
            self._signing = RS256() if signing is None else signing

    def sign(self, claims: Mapping[str, Any], signing: Signing) -> str:
        """A compact JWT of `claims`, signed as `signing` says."""
        match signing:
            case RS256(published=published):
                key = self.key if published else self.unpublished_key
                return jwt.encode({"alg": "RS256", "kid": self.kid}, dict(claims), key)
            case HS256(secret=secret):
                header = b64url(json.dumps({"alg": "HS256", "kid": self.kid}, separators=(",", ":")).encode())
                payload = b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
                mac = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
                return f"{header}.{payload}.{b64url(mac)}"
            case NoSignature():
                return unsigned_token(claims)

    def id_token_for(self, authorize: Authorize) -> str:
        with self._lock:
            source, signing = self._claims, self._signing
        claims = source(authorize) if callable(source) else source
        return self.sign(claims, signing)

    # --- the endpoints ---------------------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email", "profile", "groups"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "code_challenge_methods_supported": ["S256"],
                "claims_supported": ["sub", "email", "email_verified", "name", "groups"],
            }
        )

    async def keys(self, request: Request) -> Response:
        return JSONResponse(self.jwks)

    async def authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        code = secrets.token_urlsafe(16)
        with self._lock:
            self.authorize_requests.append(query)
            self._codes[code] = query
        answer = {"code": code}
        if "state" in query:
            answer["state"] = query["state"]
        redirect_uri = query.get("redirect_uri", "")
        separator = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{urlencode(answer)}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        with self._lock:
            self.token_requests.append({"form": form, "authorization": request.headers.get("authorization")})
            authorize = self._codes.pop(form.get("code", ""), None)
        if authorize is None:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": self.id_token_for(authorize),
            },
            headers={"cache-control": "no-store"},
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.discovery),
                Route("/jwks", self.keys),
                Route("/authorize", self.authorize),
                Route("/token", self.token, methods=["POST"]),
            ]
        )


@contextlib.contextmanager
def running_rogue_idp(
    *,
    client_id: str,
    sub: str = "mallory",
    email: str = "mallory@example.com",
    name: str = "Mallory",
    groups: list[str] | None = None,
) -> Iterator[RogueIdp]:
    """Serve a `RogueIdp` on loopback (its issuer: its own URL) for the relying party `client_id`."""
    rogue = RogueIdp(client_id=client_id, sub=sub, email=email, name=name, groups=groups or [])
    with serve_in_thread(rogue.app()) as url:
        rogue.issuer = url
        yield rogue
