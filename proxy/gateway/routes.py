"""The one route decision: what a request is, read once from its raw target, before anything else happens.

The path the upstream receives is built from the `Route` decided here and nothing else, so a target that
two readers could understand differently never gets through: anything but the one spelling Anthropic uses
(no dot segments, no percent escapes, no empty segments, no `;` parameters) is refused, never normalized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxy.errors import MethodNotAllowed, NonCanonicalPath, RouteNotFound
from proxy.types import BATCHES

RouteKind = Literal[
    "messages",
    "count_tokens",
    "batch_create",
    "batch_list",
    "batch_retrieve",
    "batch_cancel",
    "batch_delete",
    "batch_results",
    "models_list",
    "model_retrieve",
    "other",
]
# A segment is what Anthropic's ids and route names are made of; it never starts with a dot, so `.`/`..` and
# hidden tricks like `.%2e` cannot be spelled, and `%` is not allowed at all.
_CANONICAL_PATH = re.compile(rb"/v1(?:/[A-Za-z0-9_~-][A-Za-z0-9_.~-]*)+")
# RFC 3986 query characters, percent escapes well formed: the query is forwarded as is and never routes.
_CANONICAL_QUERY = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*")
MAX_TARGET_BYTES = 8192
# Methods a route we do not know may be called with (the API uses these and no others).
OTHER_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
_BATCH_ACTIONS: dict[str, dict[str, RouteKind]] = {
    "": {"GET": "batch_retrieve", "DELETE": "batch_delete"},
    "cancel": {"POST": "batch_cancel"},
    "results": {"GET": "batch_results"},
}


@dataclass(frozen=True, slots=True)
class Route:
    """A classified request: which operation, on which canonical path (what the upstream receives)."""

    kind: RouteKind
    path: str
    batch_id: str | None = None

    @property
    def endpoint(self) -> str:
        """What its usage record calls it: its path, except that a batch create is `/v1/messages/batches`."""
        return BATCHES if self.kind == "batch_create" else self.path

    @property
    def is_batch(self) -> bool:
        return self.kind.startswith("batch_")

    @property
    def model_id(self) -> str | None:
        """The model a `GET /v1/models/{model_id}` names."""
        return self.path.rsplit("/", 1)[1] if self.kind == "model_retrieve" else None


def classify(method: str, target: bytes, query: bytes) -> Route:
    """The route of a request; raises `NonCanonicalPath`, `RouteNotFound` or `MethodNotAllowed` instead.

    `target` is the raw path as the client sent it (ASGI `raw_path`), `query` the raw query string.
    """
    path = _canonical(target, query)
    kinds, batch_id = _methods(path)
    kind = kinds.get(method)
    if kind is None:
        allow = ", ".join(kinds)
        raise MethodNotAllowed(
            f"{path} does not take {method[:20]}; it takes {allow}.", headers=((b"allow", allow.encode()),)
        )
    return Route(kind, path, batch_id)


def allowed_methods(target: bytes, query: bytes) -> tuple[str, ...]:
    """The methods a target's route takes (what a CORS preflight is told); refuses targets as `classify` does."""
    return tuple(_methods(_canonical(target, query))[0])


def _canonical(target: bytes, query: bytes) -> str:
    if target == b"/v1":
        raise RouteNotFound("No route /v1. The Messages API is at /v1/messages.")
    if len(target) + len(query) > MAX_TARGET_BYTES or not _CANONICAL_PATH.fullmatch(target):
        raise NonCanonicalPath(
            "The request path is not canonical: send it as Anthropic spells it (e.g. /v1/messages), without dot "
            "segments, percent escapes, empty segments or ';' parameters. spendgate never rewrites paths."
        )
    if not _CANONICAL_QUERY.fullmatch(query):
        raise NonCanonicalPath("The query string has characters that must be percent-escaped. Escape them.")
    return target.decode("ascii")


def _methods(path: str) -> tuple[dict[str, RouteKind], str | None]:
    """What each method means on a canonical path, and the batch it names; `RouteNotFound` for no such route."""
    segments = path.split("/")[2:]
    if segments[0] == "v1":
        raise RouteNotFound(
            f"No route {path}: the path has /v1 twice. Drop /v1 from the SDK's base_url "
            "(base_url='http://spendgate:8080', not 'http://spendgate:8080/v1')."
        )
    if segments[0] == "models" and len(segments) <= 2:
        # Only reading the list and one model is spendgate's business (the allow-list); the rest goes as it came.
        return {
            **dict.fromkeys(OTHER_METHODS, "other"),
            "GET": "models_list" if len(segments) == 1 else "model_retrieve",
        }, None
    if segments[0] != "messages":
        return dict.fromkeys(OTHER_METHODS, "other"), None
    if len(segments) == 1:
        return {"POST": "messages"}, None
    if segments[1:] == ["count_tokens"]:
        return {"POST": "count_tokens"}, None
    if segments[1:] == ["batches"]:
        return {"POST": "batch_create", "GET": "batch_list"}, None
    if segments[1] == "batches" and len(segments) <= 4:
        actions = _BATCH_ACTIONS.get(segments[3] if len(segments) == 4 else "")
        if actions is not None:
            return actions, segments[2]
    raise RouteNotFound(f"No route {path}. The Messages API has /v1/messages, /v1/messages/count_tokens and batches.")
