"""An incremental Server-Sent Events decoder for byte streams that arrive in arbitrary chunks.

Implements the parsing half of https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

from dataclasses import dataclass

# The spec ignores one leading U+FEFF; in UTF-8 that is these three bytes.
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event: its type (`"message"` when the stream named none) and its data."""

    event: str
    data: str


class SSEDecoder:
    """Turns chunks of a `text/event-stream` body into events, whatever the chunk boundaries.

    Only complete lines are decoded. Line breaks are ASCII bytes that never occur inside a multi-byte
    UTF-8 sequence, so a character split across chunks simply waits in the buffer with the rest of its line.
    The `id` and `retry` fields only matter to a client that reconnects, so they are ignored like
    unknown fields.
    """

    __slots__ = ("_at_start", "_data", "_event", "_line", "_skip_lf")

    def __init__(self) -> None:
        self._line = bytearray()
        self._data: list[bytes] = []
        self._event = b""
        self._at_start = True
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume the next chunk and return the events that it completed."""
        if self._skip_lf and chunk:
            # The previous chunk ended in "\r"; a "\n" right after it belongs to the same CRLF line break.
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        # The buffered partial line never holds a line break, so searching the new chunk is enough;
        # this keeps byte-at-a-time feeding linear.
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._line += chunk
            return []
        complete = bytes(self._line) + chunk[: end + 1]
        self._line = bytearray(chunk[end + 1 :])
        self._skip_lf = chunk[end] == 0x0D and end == len(chunk) - 1
        if self._at_start:
            self._at_start = False
            complete = complete.removeprefix(_BOM)

        events: list[ServerSentEvent] = []
        # bytes.splitlines breaks exactly on "\r\n", "\n" and "\r", the three line endings the spec allows.
        for line in complete.splitlines():
            if not line:
                if self._data:
                    events.append(
                        ServerSentEvent(
                            event=self._event.decode("utf-8", "replace") or "message",
                            data=b"\n".join(self._data).decode("utf-8", "replace"),
                        )
                    )
                # A blank line ends the event even when it carried no data (the spec then dispatches nothing).
                self._data = []
                self._event = b""
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
            # An empty name is a ":" comment line; other names are unknown fields. Both are ignored.
        return events
