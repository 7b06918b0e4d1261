"""What a request must look like before the gate will hold budget for it or send it anywhere.

Only the fields metering and limits depend on are checked, and only as strictly as the API itself: a request
Anthropic would accept is never refused here. Everything else in the body is the API's business.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from proxy.errors import BadRequest

# A model id as Anthropic spells them: printable ASCII, no spaces.
_MODEL = re.compile(r"[\x21-\x7e]{1,200}")
# The Batches API's own limits.
MAX_BATCH_REQUESTS = 100_000
MAX_CUSTOM_ID = 64


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """The largest `max_tokens` accepted, per model id, with a default (`proxy/gateway/output_limits.toml`)."""

    default: int
    models: dict[str, int]

    @classmethod
    def load(cls) -> OutputLimits:
        data = tomllib.loads(resources.files("proxy.gateway").joinpath("output_limits.toml").read_text())
        return cls(default=int(data["default"]), models={k: int(v) for k, v in data.get("models", {}).items()})

    def bound(self, model: str) -> int:
        return self.models.get(model, self.default)


def parse_object(body: bytes, what: str, *, parse_float: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The body as a JSON object, or `BadRequest` (invalid JSON, not an object, nested past the parser's depth);
    `parse_float` reads JSON numbers with a fraction or exponent (`float` by default)."""
    try:
        request = json.loads(body, parse_float=parse_float)
    except (ValueError, RecursionError):
        raise BadRequest(f"The request body is not valid JSON. Send {what} as a JSON object.") from None
    if not isinstance(request, dict):
        raise BadRequest(f"The request body must be a JSON object ({what}).")
    return request


def check_message_request(
    request: dict[str, Any], limits: OutputLimits, *, where: str = "", tokens: bool = True
) -> None:
    """Raise `BadRequest` unless the fields metering relies on are well formed.

    `model`: a model id; `max_tokens` (unless `tokens` is false, for token counting): an integer from 1 to the
    model's documented bound; `messages`: a list; `stream`, when present: a boolean.
    """
    model = request.get("model")
    if not isinstance(model, str) or not _MODEL.fullmatch(model):
        raise BadRequest(f"{where}model: a model id (a non-empty string without spaces, at most 200 characters).")
    if not isinstance(request.get("messages"), list):
        raise BadRequest(f"{where}messages: a list of messages is required.")
    if "stream" in request and not isinstance(request["stream"], bool):
        raise BadRequest(f"{where}stream: must be true or false.")
    if not tokens:
        return
    max_tokens = request.get("max_tokens")
    bound = limits.bound(model)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= bound:
        raise BadRequest(f"{where}max_tokens: an integer from 1 to {bound} is required for {model}.")


def check_batch_request(request: dict[str, Any], limits: OutputLimits) -> list[dict[str, Any]]:
    """Raise `BadRequest` unless a batch create is well formed, with every request checked as a Messages
    request; returns the requests."""
    requests = request.get("requests")
    if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_BATCH_REQUESTS:
        raise BadRequest(f"requests: a list of 1 to {MAX_BATCH_REQUESTS} requests is required.")
    for index, item in enumerate(requests):
        where = f"requests.{index}."
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            raise BadRequest(f"{where}params: an object with the Messages request is required.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
            raise BadRequest(f"{where}custom_id: a string of 1 to {MAX_CUSTOM_ID} characters is required.")
        check_message_request(item["params"], limits, where=f"{where}params.")
        if item["params"].get("stream") is True:
            raise BadRequest(f"{where}params.stream: batch requests cannot stream.")
    return requests
