"""`GET /v1/models` and `GET /v1/models/{id}`: a key sees the models its team may use, the upstream's answer when there
is no allow-list, and spendgate's own list when the upstream cannot answer; one unmetered record per call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.gateway.models import Paging, display_name, synthesized
from proxy.ledger.key_admin import create_key
from proxy.ledger.teams import TeamSettings, create_team
from tests.stack import Stack, running_stack, settings_for
from tests.upstream import MODELS

ALLOWED = ("claude-sonnet-4-6", "claude-haiku-4-5-20251001")


@pytest.fixture
def allowing(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose team may use `ALLOWED` only; answers to the model list are given 0.5 s."""
    with running_stack(engine, db_url, tmp_path, team=TeamSettings(models=ALLOWED), models_wait_seconds=0.5) as stack:
        yield stack


def get(stack: Stack, target: str, **headers: str) -> httpx.Response:
    return httpx.get(stack.url + target, headers={"x-api-key": stack.key, **headers})


def test_retrieving_a_model_the_team_may_not_use_is_not_found(allowing: Stack) -> None:
    assert get(allowing, "/v1/models/claude-sonnet-4-6").json() == MODELS[1]
    with (
        anthropic.Anthropic(base_url=allowing.url, api_key=allowing.key) as client,
        pytest.raises(anthropic.NotFoundError) as refused,
    ):
        client.models.retrieve("claude-opus-4-8")
    answer = refused.value.response
    assert answer.json()["error"]["type"] == "not_found_error"
    assert (answer.headers["x-spendgate-error"], answer.headers["x-should-retry"]) == ("model_not_allowed", "false")
    assert [request.path for request in allowing.upstream.requests] == ["/v1/models/claude-sonnet-4-6"]
    _, refusal = allowing.records(2)
    assert (refusal["endpoint"], refusal["status"], refusal["outcome"]) == (
        "/v1/models/claude-opus-4-8",
        404,
        "rejected",
    )


@pytest.mark.parametrize("target", ["/v1/models", "/v1/models/claude-sonnet-4-6"])
def test_the_model_routes_want_a_key(allowing: Stack, target: str) -> None:
    for headers in ({}, {"x-api-key": "sk-sg-not-a-key"}):
        answer = httpx.get(allowing.url + target, headers=headers)
        assert (answer.status_code, answer.json()["error"]["type"]) == (401, "authentication_error")
    assert allowing.upstream.requests == []


def test_without_an_allow_list_the_upstreams_list_passes_untouched(stack: Stack) -> None:
    answer = get(stack, "/v1/models?limit=2&after_id=claude-opus-4-8")
    assert [model["id"] for model in answer.json()["data"]] == [model["id"] for model in MODELS[1:3]]
    assert answer.json()["has_more"] is True
    [asked] = stack.upstream.requests
    assert asked.query == "limit=2&after_id=claude-opus-4-8"


def test_a_bad_page_size_is_refused_before_anything_goes_out(allowing: Stack) -> None:
    for limit in ("0", "1001", "ten", "²"):
        answer = get(allowing, f"/v1/models?limit={limit}")
        assert (answer.status_code, answer.json()["error"]["type"]) == (400, "invalid_request_error")
    assert allowing.upstream.requests == []


def test_an_upstream_error_is_answered_from_what_spendgate_knows(allowing: Stack) -> None:
    answer = get(allowing, "/v1/models", **{"x-fake-status": "500"})
    assert answer.status_code == 200
    assert [model["id"] for model in answer.json()["data"]] == list(ALLOWED)
    [record] = allowing.records(1)
    assert (record["status"], record["outcome"], record["error_type"]) == (200, "upstream_error", "api_error")


def test_an_upstream_refusal_is_relayed_as_it_came(allowing: Stack) -> None:
    answer = get(allowing, "/v1/models", **{"x-fake-status": "429"})
    assert (answer.status_code, answer.json()["error"]["type"]) == (429, "rate_limit_error")
    [record] = allowing.records(1)
    assert (record["status"], record["outcome"]) == (429, "upstream_error")


def test_a_slow_upstream_is_not_waited_for(allowing: Stack) -> None:
    try:
        answer = get(allowing, "/v1/models", **{"x-fake-gate": "1"})
    finally:
        allowing.upstream.gate.set()
    assert [model["id"] for model in answer.json()["data"]] == list(ALLOWED)
    [record] = allowing.records(1)
    assert (record["status"], record["outcome"], record["error_type"]) == (
        200,
        "upstream_unreachable",
        "upstream_timeout",
    )


def test_a_list_spendgate_cannot_read_is_not_relayed(engine: Engine, db_url: str, tmp_path: Path) -> None:
    create_team(engine, "research", TeamSettings(models=ALLOWED), actor="test")
    key = create_key(engine, "research", actor="test")[1]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b'{"data": "everything"}'))
    app = create_app(settings_for(db_url, "https://upstream.test", tmp_path), transport=transport)
    with TestClient(app) as client:
        answer = client.get("/v1/models", headers={"x-api-key": key})
    assert [model["id"] for model in answer.json()["data"]] == list(ALLOWED)


@pytest.mark.parametrize(
    "query, ids, has_more",
    [
        ([], ["a", "b", "c"], False),
        ([("limit", "2")], ["a", "b"], True),
        ([("limit", "2"), ("after_id", "a")], ["b", "c"], False),
        ([("limit", "1"), ("before_id", "c")], ["b"], True),
        ([("limit", "5"), ("before_id", "b")], ["a"], False),
        ([("after_id", "elsewhere")], [], False),
        ([("before_id", "elsewhere")], [], False),
    ],
)
def test_pages(query: list[tuple[str, str]], ids: list[str], has_more: bool) -> None:
    page: dict[str, Any] = Paging.read(query).page([{"id": model_id} for model_id in "abc"])
    assert ([model["id"] for model in page["data"]], page["has_more"]) == (ids, has_more)
    assert (page["first_id"], page["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))


@pytest.mark.parametrize(
    "model_id, name",
    [
        ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
        ("claude-opus-4-20250514", "Claude Opus 4"),
        ("claude-3-5-haiku-20241022", "Claude Haiku 3.5"),
        ("claude-fable-5-2", "Claude Fable 5.2"),
        ("our-own-model", "our-own-model"),
    ],
)
def test_display_names(model_id: str, name: str) -> None:
    assert display_name(model_id) == name


def test_synthesized_dates() -> None:
    assert synthesized("claude-3-5-haiku-20241022")["created_at"] == "2024-10-22T00:00:00Z"
    # No date in the id (or no such date): the epoch, as Anthropic's API says it sends for an unknown release date.
    assert synthesized("claude-sonnet-4-6")["created_at"] == "1970-01-01T00:00:00Z"
    assert synthesized("claude-x-20241399")["created_at"] == "1970-01-01T00:00:00Z"
