"""Sign-in as an attacker tries it: forged and misdirected id_tokens (from a rogue provider that signs whatever the
test chooses), replayed states, login CSRF, open redirects, session fixation, tampered cookies, cross-site forms,
device codes guessed, polled too fast or used twice, and keys past their expiry.

The proxy is a real server on loopback; the provider is `tests/rogue_idp.py`, an OpenID provider written for these
tests; cookies travel in httpx's cookie jar as a browser's would (and in real Chromium for the cross-site form).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from hypothesis import given, strategies as st
from playwright.sync_api import Browser
from sqlalchemy import Engine, func, select, update
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from proxy.app import create_app
from proxy.config import OidcSettings
from proxy.ledger import device_grants, web_sessions
from proxy.ledger.device_grants import USER_CODE_ALPHABET, normalize_user_code
from proxy.ledger.export import iter_usage
from proxy.ledger.groups import map_group
from proxy.ledger.key_admin import create_key
from proxy.ledger.people import PersonView, get_person, record_sign_in
from proxy.ledger.schema import APIKey, DeviceGrant, SignInState
from proxy.ledger.teams import TeamSettings, create_team, update_team
from proxy.surfaces.dashboard.signin import safe_return
from tests.replicas import free_port
from tests.rogue_idp import HS256, RS256, NoSignature, RogueIdp, running_rogue_idp
from tests.servers import serve_in_thread
from tests.stack import settings_for
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

CLIENT_ID = "spendgate-dashboard"
CLIENT_SECRET = "the-dashboards-client-secret-0123456789"
TOKEN = "break-glass-token"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# The rogue provider's account, as the ledger knows her once she signed in.
MALLORY = PersonView(subject="oidc:mallory", email="mallory@example.com", name="Mallory", groups=("eng",))


@dataclass
class Site:
    url: str
    rogue: RogueIdp
    engine: Engine


@pytest.fixture
def site(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Site]:
    create_team(engine, "eng", TeamSettings(), actor="test")
    create_team(engine, "research", TeamSettings(), actor="test")
    map_group(engine, "eng", "eng", actor="test")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        running_rogue_idp(client_id=CLIENT_ID, groups=["eng"]) as rogue,
        serve_in_thread(FakeAnthropic()) as upstream,
    ):
        oidc = OidcSettings(issuer=rogue.issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        settings = settings_for(
            db_url,
            upstream,
            tmp_path,
            admin_token=TOKEN,
            public_url=url,
            oidc=oidc,
            device_poll_seconds=1,
            key_cache_seconds=3600,
        )
        with serve_in_thread(create_app(settings), port=port):
            yield Site(url=url, rogue=rogue, engine=engine)


def sign_in(client: httpx.Client, site: Site, *, following: str = "") -> httpx.Response:
    """Go through the whole code flow; the last answer (the page the callback sent us to, or its refusal)."""
    return client.get(f"{site.url}/dashboard/login/oidc{following}", follow_redirects=True)


def signed_in(answer: httpx.Response) -> bool:
    """Whether the flow ended on a dashboard page of a signed-in person (it offers to sign out)."""
    return answer.status_code == 200 and 'action="/dashboard/sign-out"' in answer.text


def csrf_of(client: httpx.Client, site: Site) -> str:
    page = client.get(f"{site.url}/dashboard/me").text
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def now() -> int:
    return int(datetime.now(UTC).timestamp())


FORGERIES: dict[str, tuple[dict[str, Any], Any]] = {
    "alg none": ({}, NoSignature()),
    "HS256 with the client secret": ({}, HS256(CLIENT_SECRET)),
    "RS256 with a key the issuer never published": ({}, RS256(published=False)),
    "another issuer": ({"iss": "https://idp.elsewhere.example"}, RS256()),
    "another audience": ({"aud": "some-other-client"}, RS256()),
    "several audiences, azp another client": ({"aud": [CLIENT_ID, "other"], "azp": "other"}, RS256()),
    "another sign-in's nonce": ({"nonce": "a-nonce-from-another-sign-in"}, RS256()),
    "no nonce": ({"nonce": None}, RS256()),
    "expired an hour ago": ({"exp": now() - 3600, "iat": now() - 7200}, RS256()),
    "no subject": ({"sub": None}, RS256()),
}


def test_forged_or_misdirected_id_tokens_sign_nobody_in(site: Site) -> None:
    def confusion_secret() -> str:
        # The HS/RS confusion: the issuer's public key, used as an HMAC secret.
        return str(site.rogue.key.as_pem(private=False).decode())

    cases = {**FORGERIES, "HS256 with the issuer's public key": ({}, HS256(confusion_secret()))}
    for case, (overrides, signing) in cases.items():
        site.rogue.answer_with(lambda authorize, o=overrides: site.rogue.claims_for(authorize, **o), signing=signing)
        with httpx.Client() as client:
            answer = sign_in(client, site)
            assert not signed_in(answer), case
            assert answer.status_code == 400 and "Sign-in failed" in answer.text, case
            assert client.get(f"{site.url}/dashboard/me").status_code == 303, case
    # The same provider, honest: the sign-in works (the refusals above were for the token, not the setup).
    site.rogue.answer_with()
    with httpx.Client() as client:
        assert signed_in(sign_in(client, site))


def test_odd_characters_in_claims_are_kept_out_of_the_ledger(site: Site) -> None:
    odd = {"name": "Mal\x00lory", "groups": ["eng", "a\x00b"]}
    site.rogue.answer_with(lambda authorize: site.rogue.claims_for(authorize, **odd))
    with httpx.Client() as client:
        assert signed_in(sign_in(client, site))
    assert get_person(site.engine, "oidc:mallory") == MALLORY
    for sub in ("mal\x00lory", "mal\nlory", "x" * 251):
        site.rogue.answer_with(lambda authorize, sub=sub: site.rogue.claims_for(authorize, sub=sub))
        with httpx.Client() as client:
            assert sign_in(client, site).status_code == 400, sub


def test_a_state_is_used_once_and_only_by_the_browser_that_started_it(site: Site) -> None:
    with httpx.Client() as victim, httpx.Client() as attacker:
        # The attacker starts a sign-in and stops at the callback, then gets the victim's browser to open it.
        to_provider = attacker.get(f"{site.url}/dashboard/login/oidc")
        back = attacker.get(to_provider.headers["location"])
        callback = back.headers["location"]
        forced = victim.get(callback)
        assert forced.status_code == 400 and "did not start in this browser" in forced.text
        assert "spendgate_session" not in victim.cookies
        # The attacker's own browser completes it once; the same callback again is refused.
        assert attacker.get(callback, follow_redirects=True).status_code == 200
        assert "spendgate_session" in attacker.cookies
        state = parse_qs(urlsplit(callback).query)["state"][0]
        with httpx.Client(cookies={"spendgate_sign_in": state}) as replay:
            again = replay.get(callback)
        assert again.status_code == 400 and "expired or was already used" in again.text


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/dashboard",
        "/\\evil.example",
        "/dashboard/../..//evil.example",
        "javascript:alert(1)",
    ],
)
def test_the_return_address_never_leaves_the_dashboard(site: Site, target: str) -> None:
    with httpx.Client() as client:
        answer = sign_in(client, site, following=f"?next={httpx.QueryParams({'x': target})['x']}")
        assert signed_in(answer)
        assert urlsplit(str(answer.url)).netloc == urlsplit(site.url).netloc


@given(st.text(max_size=80) | st.sampled_from(["/dashboard", "/device?user_code=BCDF-GHJK", "/dashboard/me"]))
def test_return_addresses_stay_on_this_host(raw: str) -> None:
    kept = safe_return(raw)
    resolved = urlsplit(urljoin("http://spendgate.example/dashboard/sign-in", kept))
    assert resolved.scheme == "http" and resolved.netloc == "spendgate.example"
    assert resolved.path == "/device" or resolved.path.startswith("/dashboard")


def test_a_session_id_is_never_adopted_and_a_tampered_one_is_nobody(site: Site) -> None:
    fixed = "attacker-chosen-session-id"
    with httpx.Client() as client:
        client.cookies.set("spendgate_session", fixed, domain="127.0.0.1", path="/")
        assert signed_in(sign_in(client, site))
        issued = client.cookies["spendgate_session"]
    assert issued != fixed
    for cookie in (fixed, issued[:-1] + ("A" if issued[-1] != "A" else "B"), issued + "x", "", "x" * 5000):
        with httpx.Client(cookies={"spendgate_session": cookie}) as forged:
            assert forged.get(f"{site.url}/dashboard/me").status_code == 303, cookie
    with httpx.Client(cookies={"spendgate_session": issued}) as client:
        assert client.get(f"{site.url}/dashboard/me").status_code == 200


def test_every_change_needs_the_sessions_csrf_token(site: Site) -> None:
    record_sign_in(site.engine, MALLORY)
    view, _ = create_key(site.engine, "eng", actor="test", owner="oidc:mallory")
    with httpx.Client() as client:
        assert signed_in(sign_in(client, site))
        token = csrf_of(client, site)
        forms = [
            "/dashboard/me/keys",
            f"/dashboard/me/keys/{view.id}/rotate",
            f"/dashboard/me/keys/{view.id}/revoke",
            "/device",
            "/dashboard/sign-out",
        ]
        for path in forms:
            for given_token in ({}, {"csrf": "not-the-token"}, {"csrf": token + "x"}):
                answer = client.post(f"{site.url}{path}", data={"team": "eng", **given_token})
                assert answer.status_code == 403, (path, given_token)
        with site.engine.connect() as connection:
            keys = connection.execute(select(func.count()).select_from(APIKey).where(APIKey.revoked_at.is_(None)))
            assert keys.scalar_one() == 1  # nothing made, rotated or revoked
        assert client.get(f"{site.url}/dashboard/me").status_code == 200  # still signed in
        # With the token, the same form works (a lifetime that is no number of days gets the default).
        made = client.post(f"{site.url}/dashboard/me/keys", data={"team": "eng", "csrf": token, "days": "²"})
        assert made.status_code == 201 and "sk-sg-" in made.text
        edge = {"since": "9999-12-31T23:59:59-01:00"}
        assert client.get(f"{site.url}/dashboard/teams/eng/usage.csv", params=edge).status_code == 400


def test_a_form_on_another_site_changes_nothing(site: Site, browser: Browser) -> None:
    """A real browser, signed in, visits another site whose page posts a form to spendgate: the session cookie
    (SameSite=Lax) does not ride along, so the post is a stranger's and is sent to sign in."""

    async def evil(request: Any) -> HTMLResponse:
        return HTMLResponse(
            f'<form id="f" method="post" action="{site.url}/dashboard/me/keys">'
            '<input name="team" value="eng"></form><script>document.getElementById("f").submit()</script>'
        )

    with serve_in_thread(Starlette(routes=[Route("/", evil)]), host="127.0.0.2") as elsewhere:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{site.url}/dashboard/login/oidc")
        assert page.url == f"{site.url}/dashboard"
        with page.expect_navigation(url=re.compile(re.escape(site.url))):
            page.goto(elsewhere.replace("127.0.0.1", "127.0.0.2"))
        assert "/dashboard/sign-in" in page.url
        context.close()
    with site.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(APIKey)).scalar_one() == 0


def test_device_codes_are_polled_slowly_used_once_and_not_guessed(site: Site) -> None:
    with httpx.Client() as person, httpx.Client() as terminal:
        assert signed_in(sign_in(person, site))
        token = csrf_of(person, site)
        started = terminal.post(f"{site.url}/oauth/device_authorization", data={"client_id": "spendgate-cli"}).json()
        assert re.fullmatch(f"[{USER_CODE_ALPHABET}]{{4}}-[{USER_CODE_ALPHABET}]{{4}}", started["user_code"])

        def poll(device_code: str = started["device_code"]) -> dict[str, Any]:
            body: dict[str, Any] = terminal.post(
                f"{site.url}/oauth/token", data={"grant_type": DEVICE_GRANT, "device_code": device_code}
            ).json()
            return body

        assert poll()["error"] == "authorization_pending"
        assert poll()["error"] == "slow_down"  # at once again: faster than the interval
        assert poll("a-guessed-device-code")["error"] == "invalid_grant"
        # Approving for a team that is not yours is refused; so is a code nobody is waiting with.
        other_team = {"user_code": started["user_code"], "team": "research", "decision": "approve", "csrf": token}
        assert person.post(f"{site.url}/device", data=other_team).status_code == 400
        wrong = {"user_code": "BBBB-BBBB", "team": "eng", "decision": "approve", "csrf": token}
        assert person.post(f"{site.url}/device", data=wrong).status_code == 400
        approve = {"user_code": started["user_code"].lower(), "team": "eng", "decision": "approve", "csrf": token}
        assert person.post(f"{site.url}/device", data=approve).status_code == 200
        issued = _next_answer(poll)
        assert issued["token_type"] == "Bearer" and issued["key_owner"] == "oidc:mallory" and issued["team"] == "eng"
        assert 89 * 86400 < issued["expires_in"] <= 90 * 86400
        assert _next_answer(poll)["error"] == "expired_token"  # one key per code
        assert person.post(f"{site.url}/device", data=approve).status_code in (400, 429)
        # Guessing codes: a handful of tries, then the person waits.
        statuses = [person.post(f"{site.url}/device", data=wrong).status_code for _ in range(6)]
        assert statuses[-1] == 429
        # A refresh token works once.
        refresh = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}
        renewed = terminal.post(f"{site.url}/oauth/token", data=refresh)
        assert renewed.status_code == 200
        assert terminal.post(f"{site.url}/oauth/token", data=refresh).json()["error"] == "invalid_grant"
        # Once their groups no longer make them a member of the key's team, the key is not renewed.
        map_group(site.engine, "eng", "eng", actor="test", remove=True)
        refresh = {"grant_type": "refresh_token", "refresh_token": renewed.json()["refresh_token"]}
        assert terminal.post(f"{site.url}/oauth/token", data=refresh).json()["error"] == "invalid_grant"
        assert terminal.post(f"{site.url}/oauth/token", data={"grant_type": "password"}).json()["error"] == (
            "unsupported_grant_type"
        )


def _next_answer(poll: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The first poll's answer that is not `slow_down` (RFC 8628's interval is about the time between polls)."""

    def answered() -> dict[str, Any] | None:
        answer = poll()
        return None if answer.get("error") == "slow_down" else answer

    found = wait_until(answered, "an answer past slow_down")
    assert found is not None
    return found


@given(st.text(max_size=20))
def test_a_typed_code_is_canonical_or_nothing(typed: str) -> None:
    code = normalize_user_code(typed)
    assert code is None or (len(code) == 9 and code[4] == "-" and set(code.replace("-", "")) <= set(USER_CODE_ALPHABET))


def test_a_key_is_refused_from_its_expiry_on_even_while_cached(site: Site) -> None:
    record_sign_in(site.engine, MALLORY)
    view, key = create_key(site.engine, "eng", actor="test", owner="oidc:mallory", expires_days=1)
    message = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    soon = datetime.now(UTC) + timedelta(seconds=2)
    with site.engine.begin() as connection:
        connection.execute(update(APIKey).where(APIKey.id == view.id).values(expires_at=soon))
    assert httpx.post(f"{site.url}/v1/messages", headers=headers, json=message).status_code == 200
    # This replica keeps keys for an hour (`key_cache_seconds`): only the expiry itself can refuse it now.

    def refused() -> dict[str, Any] | None:
        answer = httpx.post(f"{site.url}/v1/messages", headers=headers, json=message)
        return answer.json() if answer.status_code == 401 else None

    error = wait_until(refused, "the key's expiry")
    assert error is not None and error["type"] == "error" and error["error"]["type"] == "authentication_error"
    assert "expired" in error["error"]["message"]


def test_a_persons_allowance_follows_their_key_not_the_header(site: Site) -> None:
    """A team's `--user-budget` is each person's: the header a client sends cannot move their spend elsewhere."""
    update_team(site.engine, "eng", TeamSettings(user_budget_usd=Decimal("0.0001")), actor="test")
    record_sign_in(site.engine, MALLORY)
    _, key = create_key(site.engine, "eng", actor="test", owner="oidc:mallory")
    _, shared = create_key(site.engine, "eng", actor="test")
    message = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    for user in ("someone-with-room", "", "oidc:somebody-else"):
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "x-spendgate-user": user}
        answer = httpx.post(f"{site.url}/v1/messages", headers=headers, json={**message, "metadata": {"user_id": user}})
        assert (answer.status_code, answer.json()["error"]["type"]) == (402, "billing_error"), user
    refusals = wait_until(lambda: [r for _, r in iter_usage(site.engine) if r["status"] == 402], "the refusals")
    assert {record["user"] for record in refusals} == {"oidc:mallory"}
    # Nor can a shared key's client speak for a person: `oidc:` users come from personal keys only.
    base = {"x-api-key": shared, "anthropic-version": "2023-06-01"}
    for headers, body in (
        ({**base, "x-spendgate-user": "oidc:mallory"}, message),
        (base, {**message, "metadata": {"user_id": "oidc:mallory"}}),
    ):
        answer = httpx.post(f"{site.url}/v1/messages", headers=headers, json=body)
        assert (answer.status_code, answer.json()["error"]["type"]) == (400, "invalid_request_error")
    # Any other user is theirs to name (here: also past the tiny allowance, so refused for budget, not as spoofing).
    ann = httpx.post(f"{site.url}/v1/messages", headers={**base, "x-spendgate-user": "ann"}, json=message)
    assert (ann.status_code, ann.json()["error"]["type"]) == (402, "billing_error")


def test_a_flood_of_sign_ins_and_device_codes_blocks_nobody(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone may start a sign-in or ask for a device code without being anybody: past their bound the oldest are
    forgotten, so a flood cannot fill the ledger, nor turn the next person away."""
    monkeypatch.setattr(web_sessions, "MAX_SIGN_INS", 3)
    monkeypatch.setattr(device_grants, "MAX_GRANTS", 3)
    with httpx.Client() as flooder:
        for _ in range(10):
            assert flooder.get(f"{site.url}/dashboard/login/oidc").status_code == 303
            assert flooder.post(f"{site.url}/oauth/device_authorization").status_code == 200
    with site.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(SignInState)).scalar_one() == 3
        assert connection.execute(select(func.count()).select_from(DeviceGrant)).scalar_one() == 3
    with httpx.Client() as person:
        assert signed_in(sign_in(person, site))
        started = person.post(f"{site.url}/oauth/device_authorization").json()
        assert "device-asked" in person.get(f"{site.url}/device", params={"user_code": started["user_code"]}).text
