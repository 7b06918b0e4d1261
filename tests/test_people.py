"""People, not keys: single sign-on against a real OpenID provider (panva's oidc-provider under Node, on loopback),
driven through real Chromium; personal keys used through the official SDK; two `spendgate serve` replicas.

What issue 28 asks, end to end: two people in two provider groups sign in, each sees only their team, each makes a
key and calls recorded under their own identity (whatever user header the client sends), an admin sees both, a
revoked key is refused by every replica within the key cache's lifetime, `spendgate login` gets a key through the
device grant and `spendgate key-helper` prints (and renews) it as Claude Code's `apiKeyHelper` expects.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page
from sqlalchemy import Engine, select

from proxy.ledger.export import iter_usage
from proxy.ledger.groups import map_group
from proxy.ledger.schema import AdminEvent
from proxy.ledger.teams import TeamSettings, create_team, update_team

# Re-exported: tests/test_sessions.py takes Claude Code's launcher from here (its home is tests/claude_code.py).
from tests.claude_code import CLAUDE_CODE_QUIET as CLAUDE_CODE_QUIET, claude_code as claude_code
from tests.idp import IdpAccount, IdpClient, running_idp, sign_in_at_idp
from tests.replicas import free_port, replica
from tests.servers import serve_in_thread
from tests.upstream import FakeAnthropic
from tests.waiting import wait_until

CLIENT_ID = "spendgate-dashboard"
CLIENT_SECRET = "a-client-secret-of-the-dashboard-0123456789"
ADMIN_TOKEN = "break-glass-admin-token"
ACCOUNTS = {
    "alice": IdpAccount(email="alice@example.com", name="Alice", groups=["eng"]),
    "bob": IdpAccount(email="bob@example.com", name="Bob", groups=["research-staff"]),
    "carol": IdpAccount(email="carol@example.com", name="Carol", groups=["spendgate-admins"]),
    "eve": IdpAccount(email="eve@elsewhere.test", name="Eve", groups=["eng"]),
}
MESSAGE: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


@dataclass
class People:
    url: str  # the replica the provider sends people back to
    second: str  # another replica on the same ledger
    issuer: str
    engine: Engine
    db_url: str
    tmp_path: Path

    def sdk(self, key: str, base: str | None = None) -> anthropic.Anthropic:
        # The client says it is someone else: a personal key's calls are its owner's all the same.
        headers = {"x-spendgate-user": "mallory"}
        return anthropic.Anthropic(base_url=base or self.url, api_key=key, max_retries=0, default_headers=headers)


@pytest.fixture
def people(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[People]:
    create_team(engine, "eng", TeamSettings(user_budget_usd=None), actor="test")
    create_team(engine, "research", TeamSettings(), actor="test")
    map_group(engine, "eng", "eng", actor="test")
    map_group(engine, "research", "research-staff", actor="test")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = IdpClient(CLIENT_ID, CLIENT_SECRET, [f"{url}/dashboard/oidc/callback"])
    with running_idp(tmp_path / "idp", clients=[client], accounts=ACCOUNTS) as issuer:
        env = {
            "SPENDGATE_OIDC_ISSUER": issuer,
            "SPENDGATE_OIDC_CLIENT_ID": CLIENT_ID,
            "SPENDGATE_OIDC_CLIENT_SECRET": CLIENT_SECRET,
            "SPENDGATE_OIDC_ADMIN_GROUPS": "spendgate-admins",
            "SPENDGATE_OIDC_ALLOWED_DOMAINS": "example.com",
            "SPENDGATE_PUBLIC_URL": url,
            "SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "SPENDGATE_KEY_CACHE_SECONDS": "1",
            "SPENDGATE_DEVICE_POLL_SECONDS": "1",
        }
        with (
            serve_in_thread(FakeAnthropic()) as upstream,
            replica(db_url, upstream, tmp_path, port=port, env=env),
            replica(db_url, upstream, tmp_path, env=env) as (second, _),
        ):
            yield People(url=url, second=second, issuer=issuer, engine=engine, db_url=db_url, tmp_path=tmp_path)


def sign_in(browser: Browser, people: People, login: str, *, start: str = "/dashboard") -> tuple[BrowserContext, Page]:
    """A fresh browser signed in as `login` through the provider, on the page it asked for first."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{people.url}{start}")
    page.get_by_test_id("sign-in-oidc").click()
    sign_in_at_idp(page, login)
    page.wait_for_load_state()
    return context, page


def create_key(page: Page, people: People, team: str) -> tuple[str, str]:
    page.goto(f"{people.url}/dashboard/me")
    page.select_option("#team", team)
    page.fill("#name", "laptop")
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_test_id("new-key")
    return shown.inner_text(), str(shown.get_attribute("data-key-id"))


def refused(key: str, base: str) -> bool:
    answer = httpx.post(
        f"{base}/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"}, json=MESSAGE
    )
    return answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"


def records_of(engine: Engine, key_id: str) -> list[dict[str, Any]]:
    return [record for _, record in iter_usage(engine) if record["key_id"] == key_id]


def test_two_people_see_only_their_team_and_spend_as_themselves(browser: Browser, people: People) -> None:
    alice_browser, alice = sign_in(browser, people, "alice")
    bob_browser, bob = sign_in(browser, people, "bob", start="/dashboard/me")
    assert bob.url == f"{people.url}/dashboard/me"  # back where the sign-in started
    # Each sees their own team only; another team's page, the ledger and the admin API do not exist for them.
    assert [row.get_attribute("data-team") for row in alice.locator("[data-testid=teams] tbody tr").all()] == ["eng"]
    for page, other in ((alice, "research"), (bob, "eng")):
        for path in (f"/dashboard/teams/{other}", f"/dashboard/teams/{other}/usage.csv", "/dashboard/ledger"):
            assert page.request.get(f"{people.url}{path}").status == 404, path
        assert page.request.get(f"{people.url}/admin/teams").status == 403
    # Each makes a key on their team and calls through the SDK; the records are theirs, whatever the header said.
    alice_key, alice_key_id = create_key(alice, people, "eng")
    bob_key, bob_key_id = create_key(bob, people, "research")
    for key in (alice_key, bob_key):
        with people.sdk(key) as sdk:
            sdk.messages.create(**MESSAGE, metadata={"user_id": "someone-else"})
    wait_until(lambda: records_of(people.engine, alice_key_id) and records_of(people.engine, bob_key_id), "records")
    [alice_call] = records_of(people.engine, alice_key_id)
    [bob_call] = records_of(people.engine, bob_key_id)
    assert (alice_call["team"], alice_call["user"]) == ("eng", "oidc:alice")
    assert (bob_call["team"], bob_call["user"]) == ("research", "oidc:bob")
    alice.goto(f"{people.url}/dashboard/me")
    assert (
        alice.locator("[data-testid=my-spend] tr[data-team=eng] [data-field=calls]").get_attribute("data-value") == "1"
    )
    # With a day and a month per person, "My spend" shows each window: her call counted in both at once.
    update_team(people.engine, "eng", TeamSettings(user_windows={"day": Decimal(5), "month": Decimal(50)}), actor="t")
    alice.reload()
    mine = alice.get_by_test_id("my-windows")
    for window, allowance in (("daily", "5"), ("monthly", "50")):
        row = mine.locator(f"tr[data-team=eng][data-window={window}]")
        assert row.locator("[data-field=allowance]").get_attribute("data-usd") == allowance
        assert row.locator("[data-field=spent]").get_attribute("data-usd") == alice_call["cost_usd"]
    # Nobody reaches another person's key: revoking Bob's key with Alice's session (and her CSRF token) is a 404.
    csrf = alice.locator("input[name=csrf]").first.get_attribute("value")
    stolen = alice.request.post(f"{people.url}/dashboard/me/keys/{bob_key_id}/revoke", form={"csrf": str(csrf)})
    assert stolen.status == 404
    assert not refused(bob_key, people.url)
    # An admin (by provider group) sees both teams and the ledger, and uses the admin API with the session.
    carol_browser, carol = sign_in(browser, people, "carol")
    shown = {row.get_attribute("data-team") for row in carol.locator("[data-testid=teams] tbody tr").all()}
    assert shown == {"eng", "research"}
    assert carol.request.get(f"{people.url}/dashboard/ledger").status == 200
    assert carol.request.get(f"{people.url}/admin/teams").status == 200
    # A change through the admin API with a session needs the session's CSRF token; the audit names the person.
    created = carol.request.post(f"{people.url}/admin/teams", data={"name": "ops"})
    assert created.status == 403
    carol.goto(f"{people.url}/dashboard/ledger")
    token = str(carol.locator("input[name=csrf]").first.get_attribute("value"))
    created = carol.request.post(f"{people.url}/admin/teams", data={"name": "ops"}, headers={"x-spendgate-csrf": token})
    assert created.status == 201
    with people.engine.connect() as connection:
        actors = dict(connection.execute(select(AdminEvent.target, AdminEvent.actor)).all())
    assert actors["ops"] == "oidc:carol" and actors[alice_key_id] == "oidc:alice"
    # Alice revokes her key from the dashboard: both replicas refuse it within their key cache's lifetime (1 s here).
    alice.goto(f"{people.url}/dashboard/me")
    alice.locator(f"tr[data-key-id='{alice_key_id}'] [data-testid=revoke]").click()
    assert alice.locator(f"tr[data-key-id='{alice_key_id}'] [data-field=state]").inner_text() == "revoked"
    assert refused(alice_key, people.url)
    wait_until(lambda: refused(alice_key, people.second), "the other replica to refuse the revoked key")
    # Bob's group no longer maps to research: his key stops working on every replica within the same bound.
    map_group(people.engine, "research", "research-staff", actor="test", remove=True)
    wait_until(lambda: all(refused(bob_key, base) for base in (people.url, people.second)), "a former member refused")
    for context in (alice_browser, bob_browser, carol_browser):
        context.close()


def test_device_login_gives_a_key_helper_for_claude_code(browser: Browser, people: People) -> None:
    credentials = people.tmp_path / "home" / "spendgate" / "credentials.json"
    env = {**os.environ, "SPENDGATE_CREDENTIALS": str(credentials)}
    login = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "login", "--url", people.url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert login.stdout is not None
        told = login.stdout.readline()
        code = told.rsplit(" ", 1)[1].strip()
        link = login.stdout.readline().strip().removeprefix("(or open ").removesuffix(")")
        assert link == f"{people.url}/device?user_code={code}"
        # The person opens the link, signs in, and approves it for their team.
        context, page = sign_in(browser, people, "alice", start=link.removeprefix(people.url))
        assert page.locator("#user_code").input_value() == code
        page.get_by_test_id("approve").click()
        assert "Approved" in page.get_by_test_id("device-done").inner_text()
        out, err = login.communicate(timeout=60)
    finally:
        if login.poll() is None:
            login.kill()
    assert login.returncode == 0, err
    stored = json.loads(credentials.read_text())
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stored["key"] not in out + err and stored["refresh_token"] not in out + err
    assert stored["key_owner"] == "oidc:alice" and stored["team"] == "eng"

    def helper(*options: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "key-helper", *options],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        # Claude Code's apiKeyHelper contract: the key, alone, on stdout.
        assert done.stdout.count("\n") == 1
        return done.stdout.strip()

    key = helper()
    assert key == stored["key"]
    with people.sdk(key) as sdk:
        sdk.messages.create(**MESSAGE)
    wait_until(lambda: records_of(people.engine, stored["key_id"]), "the device key's record")
    assert records_of(people.engine, stored["key_id"])[0]["user"] == "oidc:alice"
    # About to expire (here: told to renew with a year to go): a new key, and the old one no longer works.
    renewed = helper("--renew-before", str(400 * 86400))
    assert renewed != key and renewed.startswith("sk-sg-")
    assert refused(key, people.url)
    renewed_id = json.loads(credentials.read_text())["key_id"]
    # The real Claude Code, pointed at spendgate, with `spendgate key-helper` as its apiKeyHelper: its call is Alice's.
    settings = {"apiKeyHelper": f"{sys.executable} -m proxy.cli key-helper"}
    claude_env = {
        **env,
        **CLAUDE_CODE_QUIET,
        "HOME": str(people.tmp_path / "claude-home"),
        "ANTHROPIC_BASE_URL": people.url,
    }
    claude_env.pop("ANTHROPIC_API_KEY", None)
    (people.tmp_path / "claude-home").mkdir()
    done = subprocess.run(
        [str(claude_code()), "-p", "say hi", "--settings", json.dumps(settings)],
        env=claude_env,
        cwd=people.tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    calls = wait_until(lambda: records_of(people.engine, renewed_id), "Claude Code's calls")
    assert {(call["user"], call["status"]) for call in calls} == {("oidc:alice", 200)}
    context.close()
