"""OpenID Connect sign-in as a relying party: authorization code with PKCE (RFC 7636), the id_token checked as OpenID
Connect Core 3.1.3.7 asks: signature by a key the issuer publishes (JWKS), `iss`, `aud` (and `azp`), `exp`, `iat`
and `nonce`.

Only asymmetric signatures are accepted, whatever the token's header says: `alg: none` and HMAC algorithms are
refused, so a token signed with the client secret or with the issuer's public key used as an HMAC secret (the
HS/RS confusion) never verifies. The provider's discovery document and keys are fetched once and kept; keys are
fetched again when a token names one we do not know (the provider rotated), at most once a minute.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx

from proxy.config import OidcSettings
from proxy.ledger.people import PersonView, clean_groups, subject_of

if TYPE_CHECKING:
    from joserfc.jwk import KeySet

ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# Clocks of the provider and of this host may differ by this much.
SKEW_SECONDS = 60
DISCOVERY_SECONDS = 3600
KEYS_REFETCH_SECONDS = 60
MAX_SUBJECT = 250
HTTP_TIMEOUT = httpx.Timeout(10.0)


class SignInFailed(Exception):
    """Signing in did not succeed; the message says why in words a person can act on (never a secret)."""


@dataclass(frozen=True, slots=True)
class Provider:
    """What the issuer's discovery document says we need."""

    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    scope: str


def new_verifier() -> str:
    """A PKCE code verifier: 43 characters of the unreserved set (256 random bits)."""
    return secrets.token_urlsafe(32)


def challenge_of(verifier: str) -> str:
    """The S256 code challenge of a verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcClient:
    """One issuer and this client's registration with it."""

    def __init__(self, settings: OidcSettings, redirect_uri: str) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri
        self._provider: tuple[float, Provider] | None = None
        self._keys: tuple[float, KeySet] | None = None

    async def authorization_url(self, *, state: str, nonce: str, verifier: str) -> str:
        """Where to send the browser to sign in."""
        provider = await self._discover()
        query = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": provider.scope,
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge_of(verifier),
            "code_challenge_method": "S256",
        }
        separator = "&" if "?" in provider.authorization_endpoint else "?"
        return provider.authorization_endpoint + separator + urlencode(query)

    async def sign_in(self, code: str, *, nonce: str, verifier: str) -> PersonView:
        """Trade the authorization code for tokens and return the person the id_token vouches for."""
        provider = await self._discover()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
                answer = await http.post(
                    provider.token_endpoint, data=form, auth=(self.settings.client_id, self.settings.client_secret)
                )
        except httpx.HTTPError as error:
            raise SignInFailed(f"The identity provider did not answer ({type(error).__name__}).") from None
        tokens = _json(answer)
        if answer.status_code != 200 or not isinstance(tokens.get("id_token"), str):
            reason = tokens.get("error") or f"HTTP {answer.status_code}"
            raise SignInFailed(f"The identity provider refused the sign-in code ({str(reason)[:100]}).")
        claims = await self.verify(tokens["id_token"], nonce=nonce, provider=provider)
        return self._person(claims)

    async def verify(self, id_token: str, *, nonce: str, provider: Provider) -> dict[str, Any]:
        """The id_token's claims once every check passed; `SignInFailed` otherwise."""
        # Imported when someone signs in, not when a replica starts: the JOSE stack brings cryptography with it.
        from joserfc import jwt
        from joserfc.errors import JoseError

        algorithms = provider.algorithms
        try:
            token = jwt.decode(id_token, await self._key_set(provider, refresh=False), algorithms=algorithms)
        except (JoseError, ValueError):
            # Perhaps signed by a key the provider rotated in since we fetched its keys: look once more.
            try:
                token = jwt.decode(id_token, await self._key_set(provider, refresh=True), algorithms=algorithms)
            except (JoseError, ValueError) as error:
                raise SignInFailed(f"The identity token's signature does not verify ({error}).") from None
        claims = token.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=SKEW_SECONDS,
            iss={"essential": True, "value": self.settings.issuer},
            aud={"essential": True, "value": self.settings.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as error:
            raise SignInFailed(f"The identity token is not for this sign-in ({error.error}: {error}).") from None
        audience = claims["aud"]
        several = isinstance(audience, list) and len(audience) > 1
        if (several or "azp" in claims) and claims.get("azp") != self.settings.client_id:
            raise SignInFailed("The identity token was issued to another client (azp).")
        # `oidc:<sub>` becomes the `user` of records (at most 256 characters, printable: it is shown and exported).
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUBJECT or not sub.isprintable():
            raise SignInFailed(f"The identity token's subject is not 1 to {MAX_SUBJECT} printable characters.")
        return claims

    def _person(self, claims: dict[str, Any]) -> PersonView:
        email, name = _text(claims.get("email"), 320), _text(claims.get("name"), 200)
        allowed = self.settings.allowed_domains
        # Only an address the provider verified says which organisation someone belongs to.
        if allowed and (
            not email or claims.get("email_verified") is not True or email.rpartition("@")[2].lower() not in allowed
        ):
            raise SignInFailed("Your account's email is not a verified address in a domain allowed to sign in here.")
        return PersonView(
            subject=subject_of(claims["sub"]),
            email=email,
            name=name,
            groups=clean_groups(claims.get(self.settings.groups_claim)),
        )

    async def _discover(self) -> Provider:
        if self._provider is not None and self._provider[0] > time.monotonic():
            return self._provider[1]
        url = self.settings.issuer + "/.well-known/openid-configuration"
        document = await _get_json(url)
        # OpenID Connect Discovery 4.3: the document must name exactly the issuer it was fetched for.
        if document.get("issuer") != self.settings.issuer:
            raise SignInFailed("The identity provider's discovery document names another issuer.")
        try:
            authorize, token, jwks = (
                str(document[name]) for name in ("authorization_endpoint", "token_endpoint", "jwks_uri")
            )
        except KeyError as missing:
            raise SignInFailed(f"The identity provider's discovery document lacks {missing}.") from None
        offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = tuple(alg for alg in ASYMMETRIC if alg in offered)
        if not algorithms:
            raise SignInFailed("The identity provider signs identity tokens with no algorithm spendgate accepts.")
        # Some providers put groups in the id_token only when asked for a scope of that name (Okta's `groups`); ask
        # for it when the provider offers it, never otherwise (others refuse a scope they do not know).
        offered_scopes = document.get("scopes_supported") or []
        groups = self.settings.groups_claim
        scope = "openid email profile" + (f" {groups}" if groups in offered_scopes else "")
        provider = Provider(authorize, token, jwks, algorithms, scope)
        self._provider = (time.monotonic() + DISCOVERY_SECONDS, provider)
        return provider

    async def _key_set(self, provider: Provider, *, refresh: bool) -> KeySet:
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        now = time.monotonic()
        if self._keys is not None:
            fetched, keys = self._keys
            if now - fetched < (KEYS_REFETCH_SECONDS if refresh else DISCOVERY_SECONDS):
                return keys
        document = await _get_json(provider.jwks_uri)
        try:
            keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as error:
            raise SignInFailed(f"The identity provider's keys could not be read ({error}).") from None
        self._keys = (now, keys)
        return keys


def _text(claim: object, limit: int) -> str | None:
    """A claim as text for the ledger: a string, without NUL (PostgreSQL refuses it), at most `limit` long."""
    if not isinstance(claim, str):
        return None
    return claim.replace("\x00", "")[:limit] or None


async def _get_json(url: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            answer = await http.get(url)
    except httpx.HTTPError as error:
        raise SignInFailed(f"The identity provider did not answer ({type(error).__name__}).") from None
    if answer.status_code != 200:
        raise SignInFailed(f"The identity provider answered HTTP {answer.status_code} at {url}.")
    return _json(answer)


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
