"""How spendgate logs: one line per event on stderr (text, or JSON objects), written once per turn of the event
loop; failures that repeat are logged when they start and when they end, not at every attempt.

Every call logs a line, and a `write()` per line cost as much as metering the call (36 µs per call measured on
ext4 under load). Lines are kept until the event loop's current turn ends, then written together; warnings and
errors, lines from other threads, and the last lines at exit are written at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime

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
            try:
                if lines:
                    self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except OSError:
                # stderr cannot be written (its disk is full, its pipe closed): the lines are lost, and logging
                # must not fail the call, the writer or the task that logged them.
                pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger and message, plus a call's fields (`extra={"call": ...}`)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "call", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=True)


class Trouble:
    """A failure that repeats (the ledger down, a background task failing): logged once when it starts, again
    only when its kind of error changes, and once when it ends, with how many attempts failed meanwhile."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._failures = 0
        self._since = 0.0
        self._kind: str | None = None

    def failed(self, error: BaseException, *, detail: str = "", traceback: bool = False) -> None:
        """Note one failed attempt; `traceback` for an error that is a bug of ours (shown once, at the start)."""
        kind = error.__class__.__name__
        self._failures += 1
        if self._failures == 1:
            self._since = time.monotonic()
            self._logger.error(
                "%s failed%s: %s: %s", self._what, detail, kind, _short(error), exc_info=error if traceback else None
            )
        elif kind != self._kind:
            self._logger.error(
                "%s still failing after %d attempts, now with %s: %s", self._what, self._failures, kind, _short(error)
            )
        self._kind = kind

    def succeeded(self) -> None:
        """Note a success; if it ends a failure, say so once."""
        if self._failures:
            self._logger.warning(
                "%s recovered after %d failed attempts over %.1f s",
                self._what,
                self._failures,
                time.monotonic() - self._since,
            )
            self._failures, self._kind = 0, None


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def configure_logging(log_format: str = "text") -> None:
    """Our lines only (httpx and aiohttp would log every upstream request again), at INFO, on stderr, as text or
    one JSON object per line."""
    handler = TurnBufferedHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # Skip what the format never shows (the logging docs' "Optimization" section), the caller's frame walk above all.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for noisy in ("httpx", "httpcore", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
