from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from proxy.gateway.sse import ServerSentEvent, SSEDecoder

FIXTURES = Path(__file__).parent / "fixtures"
STREAMS = ["stream-text.sse", "stream-web-search.sse", "stream-error-midway.sse"]


def read_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def decode(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def with_line_endings(body: bytes, newline: bytes) -> bytes:
    return body.replace(b"\n", newline)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            "stream-text.sse",
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            id="text",
        ),
        pytest.param(
            "stream-web-search.sse",
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            id="web-search",
        ),
        pytest.param(
            "stream-error-midway.sse",
            ["message_start", "content_block_start", "content_block_delta", "error"],
            id="error-midway",
        ),
    ],
)
def test_fixture_event_names(name: str, expected: list[str]) -> None:
    assert [event.event for event in decode([read_fixture(name)])] == expected


def test_fixture_data_is_verbatim() -> None:
    events = decode([read_fixture("stream-text.sse")])
    assert events[2] == ServerSentEvent(event="ping", data='{"type": "ping"}')
    assert events[-1] == ServerSentEvent(event="message_stop", data='{"type":"message_stop"              }')


@pytest.mark.parametrize(
    "newline", [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")]
)
@pytest.mark.parametrize("name", STREAMS)
def test_every_split_point(name: str, newline: bytes) -> None:
    body = with_line_endings(read_fixture(name), newline)
    expected = decode([read_fixture(name)])
    assert decode([body]) == expected
    for offset in range(len(body) + 1):
        assert decode([body[:offset], body[offset:]]) == expected, offset


@pytest.mark.parametrize(
    "newline", [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")]
)
@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time(name: str, newline: bytes) -> None:
    body = with_line_endings(read_fixture(name), newline)
    assert decode(body[i : i + 1] for i in range(len(body))) == decode([read_fixture(name)])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"data: hello\n\n", [ServerSentEvent("message", "hello")], id="default-event-name"),
        pytest.param(b"data:hello\n\n", [ServerSentEvent("message", "hello")], id="data-without-space"),
        pytest.param(b"data:  two\n\n", [ServerSentEvent("message", " two")], id="only-one-space-stripped"),
        pytest.param(b"data: a:b: c \n\n", [ServerSentEvent("message", "a:b: c ")], id="colons-in-value"),
        pytest.param(b"data: a\ndata: b\ndata:\n\n", [ServerSentEvent("message", "a\nb\n")], id="data-lines-joined"),
        pytest.param(b"event: ping\ndata: {}\n\n", [ServerSentEvent("ping", "{}")], id="named-event"),
        pytest.param(b"data: {}\nevent: late\n\n", [ServerSentEvent("late", "{}")], id="event-after-data"),
        pytest.param(b"event\ndata: x\n\n", [ServerSentEvent("message", "x")], id="empty-event-name"),
        pytest.param(b": keep-alive\ndata: x\n:\n\n", [ServerSentEvent("message", "x")], id="comments"),
        pytest.param(b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n", [ServerSentEvent("message", "x")], id="other-fields"),
        pytest.param(b"Data: x\nDATA: y\n\n", [], id="field-names-case-sensitive"),
        pytest.param(b"event: ping\n\ndata: x\n\n", [ServerSentEvent("message", "x")], id="no-data-no-dispatch"),
        pytest.param(b"data\n\n", [ServerSentEvent("message", "")], id="empty-data-line-dispatches"),
        pytest.param(b"\n\n\ndata: x\n\n\n", [ServerSentEvent("message", "x")], id="extra-blank-lines"),
        pytest.param(b"data: x\n\ndata: unterminated\n", [ServerSentEvent("message", "x")], id="no-trailing-blank"),
        pytest.param(
            b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", [ServerSentEvent("message", x) for x in "abc"], id="mixed-endings"
        ),
        pytest.param(b"\xef\xbb\xbfdata: x\n\n", [ServerSentEvent("message", "x")], id="bom-stripped"),
        pytest.param(b"data: \xef\xbb\xbfx\n\n", [ServerSentEvent("message", "\ufeffx")], id="bom-kept-mid-stream"),
        pytest.param("data: é€😀\n\n".encode(), [ServerSentEvent("message", "é€😀")], id="multibyte"),
        pytest.param(b"data: \xff\n\n", [ServerSentEvent("message", "\ufffd")], id="invalid-utf8-replaced"),
        # The WHATWG spec's own example: "data\ndata" is one event of a single newline, and a final
        # field without the blank line is discarded.
        pytest.param(
            b"data\n\ndata\ndata\n\ndata:",
            [ServerSentEvent("message", ""), ServerSentEvent("message", "\n")],
            id="spec-example",
        ),
    ],
)
def test_spec_parsing(body: bytes, expected: list[ServerSentEvent]) -> None:
    assert decode([body]) == expected
    for offset in range(len(body) + 1):
        assert decode([body[:offset], body[offset:]]) == expected, offset
    assert decode(body[i : i + 1] for i in range(len(body))) == expected


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    # Were "\r" + "\n" two breaks, the empty line between them would dispatch "a" on its own.
    assert decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [ServerSentEvent("message", "a\nb")]


def test_cr_then_blank_line_across_chunks() -> None:
    assert decode([b"data: a\r", b"\r", b"data: b\r\r"]) == [
        ServerSentEvent("message", "a"),
        ServerSentEvent("message", "b"),
    ]


def test_feed_returns_events_completed_by_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: ping\nda") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b'ta: {"type": "ping"}\n') == []
    assert decoder.feed(b"\ndata: 1\n\ndata: 2\n\ndata: 3") == [
        ServerSentEvent("ping", '{"type": "ping"}'),
        ServerSentEvent("message", "1"),
        ServerSentEvent("message", "2"),
    ]
    assert decoder.feed(b"\n\n") == [ServerSentEvent("message", "3")]
