"""`/admin/openapi.json`: a valid OpenAPI 3.1 document covering every admin route, and every answer the API
gives (successes and refusals) matches the schema the document states for it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.surfaces.admin.routes import admin_routes
from proxy.surfaces.sessions import Access
from tests.stack import settings_for
from tests.upstream import fixture
from tests.waiting import wait_until

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=fixture("message.json"), headers={"content-type": "application/json"})

    app = create_app(
        settings_for(db_url, "https://upstream.test", tmp_path, admin_token=TOKEN),
        transport=httpx.MockTransport(upstream),
    )
    with TestClient(app) as client:
        yield client


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    answer = client.get("/admin/openapi.json", headers=AUTH)
    assert answer.status_code == 200
    doc: dict[str, Any] = answer.json()
    return doc


def checker(document: dict[str, Any]) -> Callable[[str, str, Any], None]:
    """Checks an answer against the schema the document gives for its route, method and status."""

    def check(template: str, method: str, answer: Any) -> None:
        responses = document["paths"][template][method.lower()]["responses"]
        assert str(answer.status_code) in responses, (template, method, answer.status_code, answer.text)
        schema = responses[str(answer.status_code)]["content"]["application/json"]["schema"]
        Draft202012Validator({**schema, "components": document["components"]}).validate(answer.json())

    return check


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    # Every field a request model accepts is in the document, described.
    team = document["components"]["schemas"]["TeamCreate"]
    assert set(team["properties"]) == {
        "name",
        "budget_usd",
        "period",
        "max_output_tokens",
        "cap_policy",
        "models",
        "retry_window_seconds",
        "user_budget_usd",
        "rpm",
        "itpm",
        "otpm",
        "daily_budget_usd",
        "weekly_budget_usd",
        "monthly_budget_usd",
        "user_daily_budget_usd",
        "user_weekly_budget_usd",
        "user_monthly_budget_usd",
        "budget_edge",
    }
    assert team["required"] == ["name"] and team["additionalProperties"] is False


def test_every_admin_route_is_documented(document: dict[str, Any]) -> None:
    routes = {
        (route.path, method.lower())
        for route in admin_routes(TOKEN, Access(TOKEN, frozenset()))
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented


def test_the_document_needs_the_admin_token(client: TestClient) -> None:
    assert client.get("/admin/openapi.json").status_code == 401


def test_every_answer_matches_the_document(client: TestClient, document: dict[str, Any]) -> None:
    check = checker(document)
    calls: list[tuple[str, str, str, dict[str, Any]]] = [
        ("POST", "/admin/teams", "/admin/teams", {"json": {"name": "research", "budget_usd": "100", "models": ["m"]}}),
        ("POST", "/admin/teams", "/admin/teams", {"json": {"name": "research"}}),  # 409
        ("POST", "/admin/teams", "/admin/teams", {"json": {"name": "x", "colour": "red"}}),  # 400
        ("POST", "/admin/teams", "/admin/teams", {"content": b"[1, 2"}),  # 400
        ("GET", "/admin/teams", "/admin/teams", {}),
        ("GET", "/admin/teams/{name}", "/admin/teams/research", {}),
        ("GET", "/admin/teams/{name}", "/admin/teams/nobody", {}),  # 404
        ("PATCH", "/admin/teams/{name}", "/admin/teams/research", {"json": {"budget_usd": 12.5, "models": None}}),
        ("PATCH", "/admin/teams/{name}", "/admin/teams/research", {"json": {"max_output_tokens": True}}),  # 400
        ("PATCH", "/admin/teams/{name}", "/admin/teams/nobody", {"json": {}}),  # 404
        ("POST", "/admin/teams/{name}/keys", "/admin/teams/research/keys", {"json": {"name": "ci", "budget_usd": 5}}),
        ("POST", "/admin/teams/{name}/keys", "/admin/teams/research/keys", {"json": {"period": "year"}}),  # 400
        ("POST", "/admin/teams/{name}/keys", "/admin/teams/nobody/keys", {"json": {}}),  # 404
        ("GET", "/admin/teams/{name}/keys", "/admin/teams/research/keys", {}),
        ("GET", "/admin/teams/{name}/keys", "/admin/teams/nobody/keys", {}),  # 404
        ("DELETE", "/admin/keys/{key_id}", "/admin/keys/key_missing", {}),  # 404
        ("PATCH", "/admin/teams/{name}", "/admin/teams/research", {"json": {"rpm": 600, "user_budget_usd": "1.5"}}),
        ("PATCH", "/admin/keys/{key_id}", "/admin/keys/key_missing", {"json": {"rpm": 5}}),  # 404
        ("PATCH", "/admin/keys/{key_id}", "/admin/keys/key_missing", {"json": {"rpm": 0}}),  # 400
        ("GET", "/admin/teams/{name}/users", "/admin/teams/research/users", {}),
        ("GET", "/admin/teams/{name}/users", "/admin/teams/nobody/users", {}),  # 404
        (
            "PUT",
            "/admin/teams/{name}/user-budgets",
            "/admin/teams/research/user-budgets",
            {"json": {"user": "ann", "budget_usd": "2"}},
        ),
        (
            "PUT",
            "/admin/teams/{name}/user-budgets",
            "/admin/teams/research/user-budgets",
            {"json": {"user": "ann"}},
        ),  # 400
        (
            "PUT",
            "/admin/teams/{name}/user-budgets",
            "/admin/teams/nobody/user-budgets",
            {"json": {"user": "a", "budget_usd": None}},
        ),  # 404
        (
            "DELETE",
            "/admin/teams/{name}/user-budgets",
            "/admin/teams/research/user-budgets",
            {"params": {"user": "ann"}},
        ),
        ("DELETE", "/admin/teams/{name}/user-budgets", "/admin/teams/research/user-budgets", {}),  # 400
        (
            "DELETE",
            "/admin/teams/{name}/user-budgets",
            "/admin/teams/nobody/user-budgets",
            {"params": {"user": "a"}},
        ),  # 404
        ("PUT", "/admin/teams/{name}/groups", "/admin/teams/research/groups", {"json": {"group": "eng"}}),
        ("PUT", "/admin/teams/{name}/groups", "/admin/teams/research/groups", {"json": {"group": ""}}),  # 400
        ("PUT", "/admin/teams/{name}/groups", "/admin/teams/nobody/groups", {"json": {"group": "eng"}}),  # 404
        ("GET", "/admin/teams/{name}/groups", "/admin/teams/research/groups", {}),
        ("GET", "/admin/teams/{name}/groups", "/admin/teams/nobody/groups", {}),  # 404
        ("DELETE", "/admin/teams/{name}/groups", "/admin/teams/research/groups", {"params": {"group": "eng"}}),
        ("DELETE", "/admin/teams/{name}/groups", "/admin/teams/research/groups", {}),  # 400
        ("DELETE", "/admin/teams/{name}/groups", "/admin/teams/nobody/groups", {"params": {"group": "eng"}}),  # 404
        ("POST", "/admin/keys/{key_id}/rotate", "/admin/keys/key_missing/rotate", {}),  # 404
        ("GET", "/admin/usage", "/admin/usage", {"params": {"limit": "1"}}),
        ("GET", "/admin/usage", "/admin/usage", {"params": {"limit": "0"}}),  # 400
        ("GET", "/admin/usage", "/admin/usage", {"params": {"colour": "red"}}),  # 400
        ("GET", "/admin/report", "/admin/report", {"params": {"by": "team,model"}}),
        ("GET", "/admin/report", "/admin/report", {"params": {"by": "colour"}}),  # 400
        ("GET", "/admin/openapi.json", "/admin/openapi.json", {}),
    ]
    seen: set[tuple[str, str, int]] = set()
    for method, template, path, options in calls:
        answer = client.request(method, path, headers=AUTH, **options)
        check(template, method, answer)
        seen.add((template, method.lower(), answer.status_code))
    # A call through the proxy, then its record in the usage page and the report.
    key = client.post("/admin/teams/research/keys", headers=AUTH, json={}).json()
    message = {"model": "claude-sonnet-4-6", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    assert client.post("/v1/messages", headers={"x-api-key": key["key"]}, json=message).status_code == 200
    limited = client.patch(f"/admin/keys/{key['id']}", headers=AUTH, json={"otpm": 1000, "rpm": None})
    check("/admin/keys/{key_id}", "PATCH", limited)
    assert limited.json()["otpm"] == 1000
    seen.add(("/admin/keys/{key_id}", "patch", limited.status_code))
    rotated = client.post(f"/admin/keys/{key['id']}/rotate", headers=AUTH)
    check("/admin/keys/{key_id}/rotate", "POST", rotated)
    seen.add(("/admin/keys/{key_id}/rotate", "post", rotated.status_code))
    key = rotated.json()
    revoked = client.delete(f"/admin/keys/{key['id']}", headers=AUTH)
    check("/admin/keys/{key_id}", "DELETE", revoked)
    seen.add(("/admin/keys/{key_id}", "delete", revoked.status_code))
    wait_until(lambda: client.get("/admin/usage", headers=AUTH).json()["data"], "the call's record")
    for template in ("/admin/usage", "/admin/report"):
        answer = client.get(template, headers=AUTH)
        check(template, "GET", answer)
        assert answer.json()["data"]
    unauthorized = client.get("/admin/teams", headers={"authorization": "Bearer wrong"})
    check("/admin/teams", "GET", unauthorized)
    # Every route that reads a body refuses one over the limit, documented as such.
    too_large = b"[" * (1024 * 1024 + 1)
    for template, item in document["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                path = template.replace("{name}", "research").replace("{key_id}", "key_missing")
                answer = client.request(method, path, headers=AUTH, content=too_large)
                check(template, method, answer)
                assert answer.status_code == 413
                seen.add((template, method, answer.status_code))
    # Every documented success and refusal but 401 (checked just above) and 503 (the ledger down) was seen.
    documented = {
        (path, method, int(status))
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
        if status not in ("401", "503")
    }
    assert documented - seen == set()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
team_fields = st.sampled_from(
    ["name", "budget_usd", "period", "max_output_tokens", "cap_policy", "models", "retry_window_seconds", "x"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(team_fields, json_values, max_size=7) | json_values)
def test_any_json_body_gets_a_documented_answer(client: TestClient, document: dict[str, Any], body: Any) -> None:
    check = checker(document)
    for method, template, path in (
        ("POST", "/admin/teams", "/admin/teams"),
        ("PATCH", "/admin/teams/{name}", "/admin/teams/nobody"),
        ("POST", "/admin/teams/{name}/keys", "/admin/teams/nobody/keys"),
    ):
        answer = client.request(method, path, headers=AUTH, content=json.dumps(body))
        check(template, method, answer)
        assert answer.status_code < 500
