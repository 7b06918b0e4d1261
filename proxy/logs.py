"""How spendgate logs: one line per event on stderr, written once per turn of the event loop.

Every call logs a line, and a `write()` per line cost as much as metering the call (36 µs per call measured on
ext4 under load). Lines are kept until the event loop's current turn ends, then written together; warnings and
errors, lines from other threads, and the last lines at exit are written at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes the lines of one event-loop turn with one `write()`."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the formatted line; write now when it matters or when there is no loop to write it later."""
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # not on the event loop's thread
                self.flush()

    def flush(self) -> None:
        """Write every kept line."""
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


def configure_logging() -> None:
    """Our lines only (httpx and aiohttp would log every upstream request again), at INFO, on stderr."""
    handler = TurnBufferedHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # Skip what the format never shows (the logging docs' "Optimization" section), the caller's frame walk above all.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for noisy in ("httpx", "httpcore", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
