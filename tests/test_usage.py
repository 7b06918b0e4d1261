from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from proxy.gateway.usage import MessageSummary, StreamUsage, parse_usage, summarize_json
from proxy.types import IterationUsage, Usage

FIXTURES = Path(__file__).parent / "fixtures"


def read_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def summarize_stream(chunks: Iterable[bytes]) -> MessageSummary:
    stream = StreamUsage()
    for chunk in chunks:
        stream.feed(chunk)
    return stream.summary()


def sse(*events: tuple[str, Any]) -> bytes:
    """Build a stream from (event name, payload) pairs; a `str` payload is sent as-is."""
    parts = []
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        parts.append(f"event: {name}\ndata: {data}\n\n")
    return "".join(parts).encode()


def message_start(usage: dict[str, Any] | None, model: str = "claude-sonnet-4-6") -> tuple[str, Any]:
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "usage": usage,
    }
    return ("message_start", {"type": "message_start", "message": message})


def message_delta(usage: dict[str, Any] | None, stop_reason: str | None = "end_turn") -> tuple[str, Any]:
    return ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": usage})


MESSAGE_STOP = ("message_stop", {"type": "message_stop"})

TEXT_SUMMARY = MessageSummary(
    usage=Usage(input_tokens=135, output_tokens=10, service_tier="standard", inference_geo="not_available"),
    response_model="claude-sonnet-4-5-20250929",
    error_type=None,
    complete=True,
)
WEB_SEARCH_SUMMARY = MessageSummary(
    usage=Usage(
        input_tokens=10682, output_tokens=510, web_search_requests=1, service_tier="standard", inference_geo="global"
    ),
    response_model="claude-opus-5",
    error_type=None,
    complete=True,
)
ERROR_MIDWAY_SUMMARY = MessageSummary(
    usage=Usage(input_tokens=1200, output_tokens=1, service_tier="standard", inference_geo="global"),
    response_model="claude-sonnet-4-6",
    error_type="overloaded_error",
    complete=False,
)
FIXTURE_STREAMS = [
    pytest.param("stream-text.sse", TEXT_SUMMARY, id="text"),
    pytest.param("stream-web-search.sse", WEB_SEARCH_SUMMARY, id="web-search"),
    pytest.param("stream-error-midway.sse", ERROR_MIDWAY_SUMMARY, id="error-midway"),
]
NEWLINES = [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")]


@pytest.mark.parametrize("newline", NEWLINES)
@pytest.mark.parametrize(("name", "expected"), FIXTURE_STREAMS)
def test_fixture_stream_every_split_point(name: str, expected: MessageSummary, newline: bytes) -> None:
    body = read_fixture(name).replace(b"\n", newline)
    for offset in range(len(body) + 1):
        assert summarize_stream([body[:offset], body[offset:]]) == expected, offset


@pytest.mark.parametrize("newline", NEWLINES)
@pytest.mark.parametrize(("name", "expected"), FIXTURE_STREAMS)
def test_fixture_stream_one_byte_at_a_time(name: str, expected: MessageSummary, newline: bytes) -> None:
    body = read_fixture(name).replace(b"\n", newline)
    assert summarize_stream(body[i : i + 1] for i in range(len(body))) == expected


def test_web_search_input_grows_during_turn() -> None:
    before, delta, after = read_fixture("stream-web-search.sse").partition(b"event: message_delta")
    stream = StreamUsage()
    stream.feed(before)
    assert stream.summary() == MessageSummary(
        usage=Usage(input_tokens=2679, output_tokens=3, service_tier="standard", inference_geo="global"),
        response_model="claude-opus-5",
        error_type=None,
        complete=False,
    )
    stream.feed(delta + after)
    assert stream.summary() == WEB_SEARCH_SUMMARY


def test_summary_before_any_event() -> None:
    stream = StreamUsage()
    stream.feed(b"event: message_start\ndata: {")
    assert stream.summary() == MessageSummary(usage=None, response_model=None, error_type=None, complete=False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            sse(message_start({"input_tokens": 10, "output_tokens": 1}), message_delta({"output_tokens": 7})),
            Usage(input_tokens=10, output_tokens=7),
            id="delta-keeps-missing-fields",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 10, "output_tokens": 1}),
                message_delta({"output_tokens": 5}, stop_reason=None),
                message_delta({"input_tokens": 12, "output_tokens": 9}),
            ),
            Usage(input_tokens=12, output_tokens=9),
            id="deltas-overwrite-never-add",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4}),
                message_delta({"input_tokens": None, "output_tokens": 3, "cache_read_input_tokens": None}),
            ),
            Usage(input_tokens=10, output_tokens=3, cache_read_input_tokens=4),
            id="null-means-absent",
        ),
        pytest.param(
            sse(
                message_start(
                    {
                        "input_tokens": 5,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 3000,
                        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                    }
                ),
                message_delta({"output_tokens": 40, "cache_creation_input_tokens": 3500}),
            ),
            Usage(
                input_tokens=5,
                output_tokens=40,
                cache_creation_5m_input_tokens=1500,
                cache_creation_1h_input_tokens=2000,
            ),
            id="delta-total-without-breakdown-keeps-1h",
        ),
        pytest.param(
            sse(
                message_start(
                    {
                        "input_tokens": 5,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 3000,
                        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                    }
                ),
                message_delta({"output_tokens": 40, "cache_creation_input_tokens": 1500}),
            ),
            Usage(
                input_tokens=5, output_tokens=40, cache_creation_5m_input_tokens=0, cache_creation_1h_input_tokens=2000
            ),
            id="delta-total-below-1h-never-negative",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1, "cache_creation_input_tokens": 800}),
                message_delta({"output_tokens": 2, "cache_creation_input_tokens": 900}),
            ),
            Usage(input_tokens=5, output_tokens=2, cache_creation_5m_input_tokens=900),
            id="no-breakdown-anywhere-counts-as-5m",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1, "server_tool_use": {"web_search_requests": 1}}),
                message_delta(
                    {
                        "output_tokens": 2,
                        "server_tool_use": {"web_fetch_requests": 2, "code_execution_requests": 1},
                    }
                ),
            ),
            Usage(input_tokens=5, output_tokens=2, web_search_requests=1, web_fetch_requests=2),
            id="server-tool-use-unknown-keys",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1, "service_tier": "priority", "speed": "fast"}),
                message_delta({"output_tokens": 2}),
            ),
            Usage(input_tokens=5, output_tokens=2, service_tier="priority", speed="fast"),
            id="modifiers-from-message-start",
        ),
        pytest.param(
            sse(
                message_start(
                    {
                        "input_tokens": 5,
                        "output_tokens": 1,
                        "iterations": [{"type": "message", "model": "claude-opus-4-7", "input_tokens": 5}],
                    }
                ),
                message_delta(
                    {
                        "input_tokens": 23000,
                        "output_tokens": 1000,
                        "iterations": [
                            {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
                            {
                                "type": "message",
                                "model": "claude-opus-4-7",
                                "input_tokens": 23000,
                                "output_tokens": 1000,
                            },
                        ],
                    }
                ),
            ),
            Usage(
                input_tokens=23000,
                output_tokens=1000,
                iterations=(
                    IterationUsage(type="compaction", input_tokens=180000, output_tokens=3500),
                    IterationUsage(type="message", model="claude-opus-4-7", input_tokens=23000, output_tokens=1000),
                ),
            ),
            id="delta-iterations-overwrite",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1}),
                ("ping", {"type": "ping"}),
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
                ("content_block_delta", "not json at all"),
                ("future_event", "{garbage"),
                # Routed by the SSE event name: a look-alike payload under another name is not counted.
                ("future_event", {"type": "message_delta", "usage": {"output_tokens": 999}}),
                message_delta({"output_tokens": 2}),
            ),
            Usage(input_tokens=5, output_tokens=2),
            id="pings-and-unknown-events-skipped",
        ),
        pytest.param(
            b": comment\n\n" + sse(message_start({"input_tokens": 5, "output_tokens": 1})) + b": keep-alive\n\n",
            Usage(input_tokens=5, output_tokens=1),
            id="comments",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1}),
                ("message_delta", '{"type":"message_delta","usage":{"output_tokens":'),
                ("message_delta", '[{"usage": {"output_tokens": 3}}]'),
                ("message_delta", '{"type":"message_delta","usage":{"output_tokens":8,"input_tokens":"9"}}      '),
            ),
            Usage(input_tokens=5, output_tokens=8),
            id="malformed-deltas-ignored",
        ),
        pytest.param(
            sse(message_delta({"input_tokens": 3, "output_tokens": 4})),
            Usage(input_tokens=3, output_tokens=4),
            id="delta-without-message-start",
        ),
    ],
)
def test_stream_usage(body: bytes, expected: Usage) -> None:
    assert summarize_stream([body]).usage == expected
    assert summarize_stream(body[i : i + 1] for i in range(len(body))).usage == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1}, model="claude-opus-4-7"),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {
                            "type": "fallback",
                            "from": {"model": "claude-opus-4-7"},
                            "to": {"model": "claude-sonnet-4-5"},
                            "trigger": {"type": "refusal", "category": None},
                        },
                    },
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                message_delta({"output_tokens": 2}),
                MESSAGE_STOP,
            ),
            MessageSummary(
                usage=Usage(input_tokens=5, output_tokens=2),
                response_model="claude-sonnet-4-5",
                error_type=None,
                complete=True,
            ),
            id="fallback-block-names-served-model",
        ),
        pytest.param(
            sse(
                message_start(None, model="claude-opus-4-7"),
                (
                    "content_block_start",
                    {"type": "content_block_start", "content_block": {"type": "fallback", "to": None}},
                ),
            ),
            MessageSummary(usage=None, response_model="claude-opus-4-7", error_type=None, complete=False),
            id="fallback-without-target-and-null-usage",
        ),
        pytest.param(
            sse(message_start({"input_tokens": 5, "output_tokens": 1}), message_delta({"output_tokens": 2})),
            MessageSummary(
                usage=Usage(input_tokens=5, output_tokens=2),
                response_model="claude-sonnet-4-6",
                error_type=None,
                complete=True,
            ),
            id="stop-reason-without-message-stop",
        ),
        pytest.param(
            sse(
                message_start({"input_tokens": 5, "output_tokens": 1}),
                message_delta({"output_tokens": 2}, stop_reason=None),
            ),
            MessageSummary(
                usage=Usage(input_tokens=5, output_tokens=2),
                response_model="claude-sonnet-4-6",
                error_type=None,
                complete=False,
            ),
            id="delta-without-stop-reason",
        ),
        pytest.param(
            sse(
                ("message_start", {"message": []}),
                ("message_delta", {"usage": "x", "delta": 1}),
                ("content_block_start", {"content_block": "fallback"}),
                ("error", {"error": "boom"}),
                ("error", "null"),
            ),
            MessageSummary(usage=None, response_model=None, error_type=None, complete=False),
            id="wrong-json-types",
        ),
        pytest.param(
            b"\x00\xff\xfe garbage \r\n\r\n" + bytes(range(256)),
            MessageSummary(usage=None, response_model=None, error_type=None, complete=False),
            id="garbage-bytes",
        ),
    ],
)
def test_stream_summary(body: bytes, expected: MessageSummary) -> None:
    assert summarize_stream([body]) == expected
    assert summarize_stream(body[i : i + 1] for i in range(len(body))) == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param(
            json.loads(read_fixture("message.json"))["usage"],
            Usage(input_tokens=406, output_tokens=50, service_tier="standard", inference_geo="not_available"),
            id="message-fixture",
        ),
        pytest.param(
            {"input_tokens": 11, "output_tokens": 1},
            Usage(input_tokens=11, output_tokens=1),
            id="older-minimal-shape",
        ),
        pytest.param(
            {
                "input_tokens": 10,
                "cache_creation_input_tokens": 2500,
                "cache_read_input_tokens": 700,
                "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 500},
                "output_tokens": 34,
                "service_tier": "batch",
                "inference_geo": "us",
                "speed": "fast",
            },
            Usage(
                input_tokens=10,
                output_tokens=34,
                cache_creation_5m_input_tokens=2000,
                cache_creation_1h_input_tokens=500,
                cache_read_input_tokens=700,
                service_tier="batch",
                inference_geo="us",
                speed="fast",
            ),
            id="breakdown-and-modifiers",
        ),
        pytest.param(
            {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 1234, "cache_creation": None},
            Usage(input_tokens=10, output_tokens=2, cache_creation_5m_input_tokens=1234),
            id="no-breakdown-counts-as-5m",
        ),
        pytest.param(
            {
                "input_tokens": None,
                "output_tokens": True,
                "cache_read_input_tokens": "12",
                "server_tool_use": None,
                "service_tier": None,
                "iterations": None,
            },
            Usage(),
            id="null-and-wrong-types-absent",
        ),
        pytest.param(
            {
                "input_tokens": 1,
                "output_tokens": 2,
                "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 4},
            },
            Usage(input_tokens=1, output_tokens=2, web_search_requests=3, web_fetch_requests=4),
            id="server-tool-use",
        ),
        pytest.param(
            {
                "input_tokens": 23000,
                "output_tokens": 1000,
                "iterations": [
                    {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500},
                    {
                        "type": "advisor_message",
                        "model": "claude-opus-4-7",
                        "input_tokens": 300,
                        "output_tokens": 20,
                        "cache_creation_input_tokens": 90,
                        "cache_read_input_tokens": 40,
                    },
                    {
                        "type": "fallback_message",
                        "model": "claude-sonnet-4-5",
                        "input_tokens": 23000,
                        "output_tokens": 1000,
                        "cache_creation_input_tokens": 70,
                        "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 40},
                    },
                    "not-an-object",
                    {"input_tokens": 8},
                ],
            },
            Usage(
                input_tokens=23000,
                output_tokens=1000,
                iterations=(
                    IterationUsage(type="compaction", input_tokens=180000, output_tokens=3500),
                    IterationUsage(
                        type="advisor_message",
                        model="claude-opus-4-7",
                        input_tokens=300,
                        output_tokens=20,
                        cache_creation_5m_input_tokens=90,
                        cache_read_input_tokens=40,
                    ),
                    IterationUsage(
                        type="fallback_message",
                        model="claude-sonnet-4-5",
                        input_tokens=23000,
                        output_tokens=1000,
                        cache_creation_5m_input_tokens=30,
                        cache_creation_1h_input_tokens=40,
                    ),
                    IterationUsage(type="unknown", input_tokens=8),
                ),
            ),
            id="iterations",
        ),
    ],
)
def test_parse_usage(usage: dict[str, Any], expected: Usage) -> None:
    assert parse_usage(usage) == expected


def test_parse_usage_batch_results() -> None:
    lines = read_fixture("batch-results.jsonl").splitlines()
    usages = [parse_usage(json.loads(line)["result"]["message"]["usage"]) for line in lines[:2]]
    assert usages == [
        Usage(input_tokens=11, output_tokens=36, service_tier="batch", inference_geo="global"),
        Usage(
            input_tokens=10,
            output_tokens=34,
            cache_creation_5m_input_tokens=2000,
            service_tier="batch",
            inference_geo="global",
        ),
    ]


NOTHING = MessageSummary(usage=None, response_model=None, error_type=None, complete=False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            read_fixture("message.json"),
            MessageSummary(
                usage=Usage(input_tokens=406, output_tokens=50, service_tier="standard", inference_geo="not_available"),
                response_model="claude-sonnet-4-5-20250929",
                error_type=None,
                complete=True,
            ),
            id="message",
        ),
        pytest.param(
            b'\n  {"type": "message", "model": "claude-sonnet-4-6",'
            b' "usage": {"input_tokens": 3, "output_tokens": 4}   }  \n',
            MessageSummary(
                usage=Usage(input_tokens=3, output_tokens=4),
                response_model="claude-sonnet-4-6",
                error_type=None,
                complete=True,
            ),
            id="padded-message",
        ),
        pytest.param(
            json.dumps(
                {
                    "type": "message",
                    "model": "claude-opus-4-7",
                    "content": [
                        {
                            "type": "fallback",
                            "from": {"model": "claude-opus-4-7"},
                            "to": {"model": "claude-sonnet-4-5"},
                        },
                        {"type": "text", "text": "hi"},
                        "junk",
                    ],
                    "usage": {"input_tokens": 3, "output_tokens": 4},
                }
            ).encode(),
            MessageSummary(
                usage=Usage(input_tokens=3, output_tokens=4),
                response_model="claude-sonnet-4-5",
                error_type=None,
                complete=True,
            ),
            id="fallback-block",
        ),
        pytest.param(
            read_fixture("error-429.json"),
            MessageSummary(usage=None, response_model=None, error_type="rate_limit_error", complete=False),
            id="error-429",
        ),
        pytest.param(
            read_fixture("error-413.json"),
            MessageSummary(usage=None, response_model=None, error_type="request_too_large", complete=False),
            id="error-413-without-top-level-type",
        ),
        pytest.param(read_fixture("count-tokens.json"), NOTHING, id="count-tokens-is-not-a-message"),
        pytest.param(
            b'{"type": "message", "usage": null, "model": null}',
            MessageSummary(usage=None, response_model=None, error_type=None, complete=True),
            id="null-usage",
        ),
        pytest.param(b'{"usage": 5, "error": "x", "model": 7}', NOTHING, id="wrong-types"),
        pytest.param(b"<html>502 Bad Gateway</html>", NOTHING, id="html"),
        pytest.param(b"", NOTHING, id="empty"),
        pytest.param(b"\xff\xfe\x00", NOTHING, id="not-utf8"),
        pytest.param(b"[1, 2]", NOTHING, id="array"),
        pytest.param(b"[" * 100_000, NOTHING, id="deeply-nested"),
    ],
)
def test_summarize_json(body: bytes, expected: MessageSummary) -> None:
    assert summarize_json(body) == expected
