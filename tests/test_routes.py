"""The one route decision, as a table: canonical targets and their routes, everything else refused."""

from __future__ import annotations

import pytest

from proxy.errors import MethodNotAllowed, NonCanonicalPath, ProxyError, RouteNotFound
from proxy.gateway.routes import allowed_methods, classify


@pytest.mark.parametrize(
    "method, target, kind, batch_id",
    [
        ("POST", "/v1/messages", "messages", None),
        ("POST", "/v1/messages/count_tokens", "count_tokens", None),
        ("POST", "/v1/messages/batches", "batch_create", None),
        ("GET", "/v1/messages/batches", "batch_list", None),
        ("GET", "/v1/messages/batches/msgbatch_01", "batch_retrieve", "msgbatch_01"),
        ("DELETE", "/v1/messages/batches/msgbatch_01", "batch_delete", "msgbatch_01"),
        ("POST", "/v1/messages/batches/msgbatch_01/cancel", "batch_cancel", "msgbatch_01"),
        ("GET", "/v1/messages/batches/msgbatch_01/results", "batch_results", "msgbatch_01"),
        ("GET", "/v1/models", "models_list", None),
        ("GET", "/v1/models/claude-sonnet-4-5", "model_retrieve", None),
        ("HEAD", "/v1/models", "other", None),
        ("GET", "/v1/models/claude-sonnet-4-5/more", "other", None),
        ("DELETE", "/v1/files/file_011", "other", None),
    ],
)
def test_canonical_targets(method: str, target: str, kind: str, batch_id: str | None) -> None:
    route = classify(method, target.encode(), b"beta=true")
    assert (route.kind, route.path, route.batch_id) == (kind, target, batch_id)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/./messages",
        "/v1/%2e/messages",
        "/v1/%2E%2e/admin",
        "/v1/x/../messages",
        "/v1/%6Dessages",
        "/v1/messages/",
        "/v1//messages",
        "/v1/messages;x=1",
        "/v1/messages%2fbatches",
        "/v1/messages/batches/./msgbatch_01",
        "/v1/messages/batches/msgbatch_01/../msgbatch_02",
        "/v1/messages/batches/.msgbatch_01",
        "/v1/messages\\batches",
        "/v1/mess ages",
        "/v1/messages\x00",
        "/v1/",
        "/v1/" + "a" * 9000,
        "/v1/messages?x",
    ],
)
def test_non_canonical_targets_are_refused(target: str) -> None:
    with pytest.raises(NonCanonicalPath):
        classify("POST", target.encode("latin-1"), b"")


@pytest.mark.parametrize("query", [b"a b", b"a=%zz", b"x=\xff", b"a=<>", b"a#b"])
def test_odd_queries_are_refused(query: bytes) -> None:
    with pytest.raises(NonCanonicalPath):
        classify("POST", b"/v1/messages", query)


@pytest.mark.parametrize(
    "method, target, error, allow",
    [
        ("GET", "/v1/messages", MethodNotAllowed, "POST"),
        ("PUT", "/v1/messages", MethodNotAllowed, "POST"),
        ("DELETE", "/v1/messages/batches", MethodNotAllowed, "POST, GET"),
        ("POST", "/v1/messages/batches/msgbatch_01", MethodNotAllowed, "GET, DELETE"),
        ("TRACE", "/v1/models", MethodNotAllowed, "GET, POST, PUT, PATCH, DELETE, HEAD"),
        ("POST", "/v1/v1/messages", RouteNotFound, None),
        ("POST", "/v1/messages/other", RouteNotFound, None),
        ("GET", "/v1/messages/batches/msgbatch_01/other", RouteNotFound, None),
        ("GET", "/v1/messages/batches/msgbatch_01/results/more", RouteNotFound, None),
    ],
)
def test_refused_routes(method: str, target: str, error: type[ProxyError], allow: str | None) -> None:
    with pytest.raises(error) as refused:
        classify(method, target.encode(), b"")
    assert dict(refused.value.headers()).get(b"allow") == (allow.encode() if allow else None)


def test_the_base_url_mistake_gets_a_hint() -> None:
    with pytest.raises(RouteNotFound, match="Drop /v1 from the SDK's base_url"):
        classify("POST", b"/v1/v1/messages", b"")


def test_preflights_learn_the_route_methods() -> None:
    assert allowed_methods(b"/v1/messages/batches", b"") == ("POST", "GET")
    with pytest.raises(NonCanonicalPath):
        allowed_methods(b"/v1/./messages", b"")


def test_a_model_route_names_its_model() -> None:
    assert classify("GET", b"/v1/models/claude-sonnet-4-6", b"").model_id == "claude-sonnet-4-6"
    assert classify("GET", b"/v1/models", b"limit=1000").model_id is None
