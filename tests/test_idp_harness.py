"""The OpenID Connect test harness itself: the real IdP (`tests/idp.py`) signs a browser in and issues id_tokens a
relying party can verify, and the rogue IdP (`tests/rogue_idp.py`) forges the tokens it is told to."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet, OctKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.browsers import launched_chromium
from tests.idp import IdpAccount, IdpClient, running_idp, sign_in_at_idp
from tests.rogue_idp import HS256, RS256, NoSignature, RogueIdp, running_rogue_idp, token_header
from tests.servers import serve_in_thread

CLIENT_ID = "spendgate-dashboard"
CLIENT_SECRET = "harness-client-secret-0123456789"
SCOPE = "openid email profile groups"


def pkce() -> tuple[str, str]:
    """A PKCE code_verifier and its S256 code_challenge."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def b64url_json(segment: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return decoded


def test_a_browser_signs_in_at_the_idp_and_the_id_token_carries_email_and_groups(tmp_path: Path) -> None:
    callbacks: list[dict[str, str]] = []

    async def callback(request: Request) -> Response:
        callbacks.append(dict(request.query_params))
        return PlainTextResponse("signed in")

    with serve_in_thread(Starlette(routes=[Route("/callback", callback)])) as relying_party:
        redirect_uri = f"{relying_party}/callback"
        with running_idp(
            tmp_path,
            clients=[IdpClient(CLIENT_ID, CLIENT_SECRET, [redirect_uri])],
            accounts={"alice": IdpAccount("alice@example.com", "Alice Example", ["spendgate-admins", "staff"])},
        ) as issuer:
            discovery = httpx.get(f"{issuer}/.well-known/openid-configuration").json()
            assert discovery["issuer"] == issuer
            assert discovery["code_challenge_methods_supported"] == ["S256"]
            verifier, challenge = pkce()
            state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
            params = {
                "client_id": CLIENT_ID,
                "response_type": "code",
                "scope": SCOPE,
                "redirect_uri": redirect_uri,
                "state": state,
                "nonce": nonce,
            }

            # PKCE is required: without a code_challenge the IdP sends the browser back with an error, no code.
            refused = httpx.get(discovery["authorization_endpoint"], params=params)
            assert refused.is_redirect
            assert parse_qs(urlsplit(refused.headers["location"]).query)["error"] == ["invalid_request"]

            authorize = f"{discovery['authorization_endpoint']}?" + urlencode(
                {**params, "code_challenge": challenge, "code_challenge_method": "S256"}
            )
            with launched_chromium() as browser:
                page = browser.new_page()
                page.goto(authorize)
                # A login name that is no account: back to the sign-in page, nobody signed in, no code.
                with pytest.raises(AssertionError, match="has no account 'mallory'"):
                    sign_in_at_idp(page, "mallory")
                assert callbacks == []
                sign_in_at_idp(page, "alice")
                assert page.url.startswith(f"{redirect_uri}?")

            [answer] = callbacks
            assert answer["state"] == state
            assert answer["iss"] == issuer
            tokens = httpx.post(
                discovery["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": answer["code"],
                    "redirect_uri": redirect_uri,
                    "code_verifier": verifier,
                },
                auth=(CLIENT_ID, CLIENT_SECRET),
            )
            assert tokens.status_code == 200, tokens.text
            keys = KeySet.import_key_set(httpx.get(discovery["jwks_uri"]).json())

    token = jwt.decode(tokens.json()["id_token"], keys, algorithms=["RS256"])
    assert token.header["alg"] == "RS256"
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": CLIENT_ID},
        nonce={"essential": True, "value": nonce},
        exp={"essential": True},
    ).validate(token.claims)
    assert token.claims["sub"] == "alice"
    assert token.claims["email"] == "alice@example.com"
    assert token.claims["email_verified"] is True
    assert token.claims["name"] == "Alice Example"
    assert token.claims["groups"] == ["spendgate-admins", "staff"]


def test_the_rogue_idp_answers_with_the_id_token_the_test_chose() -> None:
    with running_rogue_idp(client_id=CLIENT_ID, groups=["spendgate-admins"]) as rogue:
        discovery = httpx.get(f"{rogue.issuer}/.well-known/openid-configuration").json()
        assert discovery["issuer"] == rogue.issuer
        published = KeySet.import_key_set(httpx.get(discovery["jwks_uri"]).json())

        def id_token(rogue: RogueIdp) -> str:
            """Authorize (the rogue IdP redirects at once) and exchange the code; returns the id_token."""
            state, nonce = secrets.token_urlsafe(8), secrets.token_urlsafe(8)
            query = {"client_id": CLIENT_ID, "redirect_uri": "http://127.0.0.1:9/callback", "state": state}
            redirect = httpx.get(discovery["authorization_endpoint"], params={**query, "nonce": nonce})
            assert redirect.status_code == 302
            answer = parse_qs(urlsplit(redirect.headers["location"]).query)
            assert answer["state"] == [state]
            assert rogue.last_authorize["nonce"] == nonce
            tokens = httpx.post(discovery["token_endpoint"], data={"grant_type": "authorization_code", **answer})
            assert tokens.status_code == 200
            token: str = tokens.json()["id_token"]
            return token

        # Until told otherwise, an honest answer: RS256 with the published key, the nonce the RP sent.
        honest = jwt.decode(id_token(rogue), published, algorithms=["RS256"])
        assert honest.claims["nonce"] == rogue.last_authorize["nonce"]
        assert honest.claims["iss"] == rogue.issuer
        assert honest.claims["groups"] == ["spendgate-admins"]

        rogue.answer_with(
            lambda authorize: rogue.claims_for(authorize, email="root@example.com"), signing=NoSignature()
        )
        unsigned = id_token(rogue)
        header, payload, signature = unsigned.split(".")
        assert b64url_json(header) == {"alg": "none"}
        assert b64url_json(payload)["email"] == "root@example.com"
        assert b64url_json(payload)["nonce"] == rogue.last_authorize["nonce"]
        assert signature == ""

        rogue.answer_with(signing=HS256(CLIENT_SECRET))
        confused = id_token(rogue)
        assert token_header(confused)["alg"] == "HS256"
        assert jwt.decode(confused, OctKey.import_key(CLIENT_SECRET.encode()), algorithms=["HS256"]).claims["sub"]

        rogue.answer_with({"iss": rogue.issuer, "sub": "alice"}, signing=RS256(published=False))
        forged = id_token(rogue)
        assert token_header(forged) == {"typ": "JWT", "alg": "RS256", "kid": rogue.kid}
        with pytest.raises(BadSignatureError):
            jwt.decode(forged, published, algorithms=["RS256"])
        assert len(rogue.token_requests) == len(rogue.authorize_requests) == 4
