"""A fake Anthropic API built from the recorded payloads in `tests/fixtures/`.

Tests steer it with request headers, which the proxy forwards untouched:
- `x-fake-stream: text|web-search|error-midway` picks the SSE recording (default `text`);
- `x-fake-status: 429|413|500|529` answers with that error;
- `x-fake-chunk: N` splits SSE bodies into N-byte chunks; `x-fake-delay: S` sleeps S seconds between chunks;
- `x-fake-hang: S` waits S seconds before answering at all;
- `x-fake-gate: 1` waits until the test sets `gate`, so every such call is in flight at once, however slow the machine;
- `x-fake-fail-first: N` answers 500 to the first N requests with the same body, then normally;
- `x-fake-request-id: ID` answers a message with that `request-id` (how a test pairs a ledger record with the
  request's arrival here, `Seen.arrived`).

`GET /v1/models` lists `MODELS` in pages (`limit`, `after_id`), `GET /v1/models/{id}` one of them.

Message Batches follow their lifecycle: created `in_progress`, `ended` from the first retrieve on, results as
JSONL (custom ids containing "bad" error, "late" expire, the rest succeed with the usage in `BATCH_USAGE`, without
its `service_tier` when the id contains "untiered").
A retrieve ends the batch: the first poll sees it `ended` (unless `hold_batches` is set).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

FIXTURES = Path(__file__).parent / "fixtures"
UPSTREAM_KEY = "sk-ant-upstream-secret"
STREAMS = {
    "text": "stream-text.sse",
    "web-search": "stream-web-search.sse",
    "error-midway": "stream-error-midway.sse",
}
ERRORS = {
    429: "error-429.json",
    413: "error-413.json",
}
RESPONSE_HEADERS = [
    (b"request-id", b"req_fake_0001"),
    (b"anthropic-ratelimit-requests-limit", b"4000"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"),
    (b"anthropic-organization-id", b"org-fake"),
]


def fixture(name: str) -> bytes:
    """The bytes of a recorded payload."""
    return (FIXTURES / name).read_bytes()


@dataclass
class Seen:
    """One request the fake upstream received."""

    method: str
    path: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes
    arrived: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class FakeAnthropic:
    """The fake upstream as an ASGI app; `requests` holds what it received, in order."""

    requests: list[Seen] = field(default_factory=list)
    failures: dict[bytes, int] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The upstream key it accepts (the tests' own, unless a test runs the README with its placeholder).
    key: str = UPSTREAM_KEY
    # While set, retrieving a batch leaves it in progress; `retrieves` counts retrieves per batch.
    hold_batches: bool = False
    retrieves: dict[str, int] = field(default_factory=dict)
    # Every non-streaming message answered: when, the model it named, and its usage (what Anthropic would bill).
    served: list[tuple[datetime, str, dict[str, Any]]] = field(default_factory=list)
    # Calls sent with `x-fake-gate` wait for it.
    gate: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        raw_path = scope["raw_path"].decode("latin-1")
        self.requests.append(
            Seen(scope["method"], scope["path"], raw_path, scope["query_string"].decode(), headers, body)
        )
        if "x-fake-hang" in headers:
            await asyncio.sleep(float(headers["x-fake-hang"]))
        if "x-fake-gate" in headers:
            await asyncio.to_thread(self.gate.wait)  # set from the test's thread
        if headers.get("x-api-key") != self.key:
            error = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
            await _respond(send, 401, json.dumps(error).encode())
            return
        if "x-fake-fail-first" in headers:
            failed = self.failures.get(body, 0)
            if failed < int(headers["x-fake-fail-first"]):
                self.failures[body] = failed + 1
                await _respond(send, 500, _error_body(500), extra=[(b"x-should-retry", b"true")])
                return
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            payload = ERRORS.get(status)
            error_body = fixture(payload) if payload else _error_body(status)
            await _respond(send, status, error_body, extra=[(b"x-should-retry", b"true")])
            return
        if scope["path"].startswith("/v1/messages/batches"):
            await self._batch(scope["method"], scope["path"], body, send)
            return
        if scope["path"] == "/v1/messages/count_tokens":
            await _respond(send, 200, fixture("count-tokens.json"))
            return
        if scope["path"].startswith("/v1/models"):
            await _models(scope["path"], scope["query_string"].decode(), send)
            return
        if scope["path"] != "/v1/messages" or scope["method"] != "POST":
            await _respond(send, 404, _error_body(404))
            return
        request: dict[str, Any] = json.loads(body)
        if request.get("stream"):
            await _stream(send, receive, headers)
        else:
            # The recording's bytes, with only the model swapped, so tests can compare bytes exactly.
            recorded = fixture("message.json")
            model = _resolved(request["model"])
            self.served.append((datetime.now(UTC), model, json.loads(recorded)["usage"]))
            await _respond(
                send,
                200,
                recorded.replace(b'"claude-sonnet-4-5-20250929"', json.dumps(model).encode()),
                request_id=headers.get("x-fake-request-id"),
            )

    async def _batch(self, method: str, path: str, body: bytes, send: Send) -> None:
        parts = path.removeprefix("/v1/messages/batches").strip("/").split("/")
        if method == "POST" and parts == [""]:
            batch_id = f"msgbatch_fake{len(self.batches):04}"
            self.batches[batch_id] = {"requests": json.loads(body)["requests"], "status": "in_progress"}
            await _respond(send, 200, json.dumps(self._batch_object(batch_id)).encode())
            return
        if method == "GET" and parts == [""]:
            data = [self._batch_object(batch_id) for batch_id in self.batches]
            page = {"data": data, "has_more": False, "first_id": None, "last_id": None}
            await _respond(send, 200, json.dumps(page).encode())
            return
        batch = self.batches.get(parts[0])
        if batch is None:
            await _respond(send, 404, _error_body(404))
            return
        if method == "GET" and len(parts) == 1:
            self.retrieves[parts[0]] = self.retrieves.get(parts[0], 0) + 1
            if not self.hold_batches:
                batch["status"] = "ended"
            answer = self._batch_object(parts[0])
        elif method == "POST" and parts[1:] == ["cancel"]:
            batch["status"] = "canceling"
            answer = self._batch_object(parts[0])
        elif method == "DELETE":
            del self.batches[parts[0]]
            answer = {"id": parts[0], "type": "message_batch_deleted"}
        else:
            lines = [json.dumps(_batch_result(request)) for request in batch["requests"]]
            await _respond(send, 200, ("\n".join(lines) + "\n").encode(), content_type=b"application/binary")
            return
        await _respond(send, 200, json.dumps(answer).encode())

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        ended = self.batches[batch_id]["status"] == "ended"
        return {
            **json.loads(fixture("batch.json")),
            "id": batch_id,
            "processing_status": self.batches[batch_id]["status"],
            "results_url": f"https://api.anthropic.com/v1/messages/batches/{batch_id}/results" if ended else None,
        }


BATCH_USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 2000,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 34,
    "service_tier": "batch",
    "inference_geo": "global",
}


def _batch_result(request: dict[str, Any]) -> dict[str, Any]:
    custom_id = request["custom_id"]
    if "bad" in custom_id:
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
        return {"custom_id": custom_id, "result": {"type": "errored", "error": error}}
    if "late" in custom_id:
        return {"custom_id": custom_id, "result": {"type": "expired"}}
    message = json.loads(fixture("message.json"))
    # "untiered" results carry no service_tier, as the documented results example does.
    usage = {k: v for k, v in BATCH_USAGE.items() if k != "service_tier" or "untiered" not in custom_id}
    message.update(model=request["params"]["model"], usage=usage)
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}


# The models list, newest first, as Anthropic's `GET /v1/models` has it.
MODELS = [
    {"type": "model", "id": "claude-opus-4-8", "display_name": "Claude Opus 4.8", "created_at": "2026-10-20T00:00:00Z"},
    {
        "type": "model",
        "id": "claude-sonnet-4-6",
        "display_name": "Claude Sonnet 4.6",
        "created_at": "2026-02-17T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-15T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
    },
]


async def _models(path: str, query: str, send: Send) -> None:
    """`GET /v1/models` (pages of `limit` after `after_id`) and `GET /v1/models/{id}`."""
    found = {model["id"]: model for model in MODELS}
    if path != "/v1/models":
        model = found.get(path.removeprefix("/v1/models/"))
        if model is None:
            await _respond(send, 404, _error_body(404))
        else:
            await _respond(send, 200, json.dumps(model).encode())
        return
    params = dict(parse_qsl(query))
    start = MODELS.index(found[params["after_id"]]) + 1 if "after_id" in params else 0
    data = MODELS[start : start + int(params.get("limit", "20"))]
    page = {
        "data": data,
        "has_more": start + len(data) < len(MODELS),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
    await _respond(send, 200, json.dumps(page).encode())


def _resolved(model: str) -> str:
    # Aliases resolve to a dated snapshot in responses, as the real API does for older models.
    return {"claude-sonnet-4-5": "claude-sonnet-4-5-20250929"}.get(model, model)


def _error_body(status: int) -> bytes:
    kind = {404: "not_found_error", 500: "api_error", 529: "overloaded_error"}.get(status, "invalid_request_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": f"fake {status}"}}).encode()


def _response_headers(request_id: str | None) -> list[tuple[bytes, bytes]]:
    """The headers of every answer, the request id the caller named (`x-fake-request-id`) if it named one."""
    if request_id is None:
        return RESPONSE_HEADERS
    return [(b"request-id", request_id.encode()), *(item for item in RESPONSE_HEADERS if item[0] != b"request-id")]


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
    request_id: str | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *_response_headers(request_id),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Send, receive: Receive, headers: dict[str, str]) -> None:
    body = fixture(STREAMS[headers.get("x-fake-stream", "text")])
    chunk_size = int(headers.get("x-fake-chunk", "0")) or len(body)
    delay = float(headers.get("x-fake-delay", "0"))
    response_headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        *_response_headers(headers.get("x-fake-request-id")),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": response_headers})
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        for start in range(0, len(body), chunk_size):
            await send({"type": "http.response.body", "body": body[start : start + chunk_size], "more_body": True})
            if delay:
                # Like the real API, a stream stops when its caller goes away (what it sent so far is billed).
                await asyncio.wait((gone,), timeout=delay)
                if gone.done():
                    return
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()


async def _disconnect(receive: Receive) -> None:
    """Returns once the client has disconnected."""
    while (await receive())["type"] != "http.disconnect":
        pass
