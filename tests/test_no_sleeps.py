"""The suite waits on conditions, never on the clock: a fixed sleep passes idle and fails on a busy machine."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent
# The one poller, and the fake upstream, whose sleeps are simulated latency (what a test steers), not waits.
ALLOWED = {"waiting.py", "upstream.py"}
SLEEP = re.compile(
    r"\b(?:time|asyncio|anyio|trio)\.sleep\(|^\s*from\s+(?:time|asyncio|anyio)\s+import\s+.*\bsleep\b", re.M
)


def test_no_fixed_sleeps_outside_the_poller() -> None:
    offenders = [
        f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name not in ALLOWED and path.name != Path(__file__).name
        for text in [path.read_text()]
        for match in SLEEP.finditer(text)
    ]
    assert offenders == [], "wait with tests.waiting.wait_until instead of sleeping"
