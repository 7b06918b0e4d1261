"""The HTTP server: uvicorn's httptools parser, with the bound on request heads it does not have.

httptools accepts a header of any size and copies the whole value for every chunk that arrives, so one client
sending a 100 MB header stalled every other call on the server for about 9 s (measured; see the README). h11
bounds heads but costs about twice the parser CPU. This keeps httptools and closes a connection whose head
passes `MAX_HEAD_BYTES`, answering 431 in Anthropic's error shape.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("spendgate")
# The request line and every header together; nginx's default `large_client_header_buffers` allows 32 KB.
MAX_HEAD_BYTES = 64 * 1024
_BODY = json.dumps(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"The request's headers are over {MAX_HEAD_BYTES} bytes. Send smaller headers.",
        },
    }
).encode()
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"x-spendgate-error: headers_too_large\r\nx-should-retry: false\r\nconnection: close\r\n"
    + f"content-length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over `MAX_HEAD_BYTES`."""

    _head_bytes = 0
    _in_head = True
    _tail = b""

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            # Counted before httptools sees the bytes (it would copy an oversize header first), and only up to
            # the blank line that ends the head: the same read often carries the start of the body.
            seen = self._tail + data
            ends = [at + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (at := seen.find(mark)) >= 0]
            self._head_bytes += (min(ends) - len(self._tail)) if ends else len(data)
            self._tail = seen[-3:]
            if self._head_bytes > MAX_HEAD_BYTES:
                logger.warning("closed a connection whose request head passed %d bytes", MAX_HEAD_BYTES)
                self.transport.write(_REFUSAL)
                self.transport.close()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
