"""Waiting on conditions, never on the clock: the one place the suite polls."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")
# Generous: on a loaded 2-core machine a condition that holds in 50 ms idle can take seconds.
DEADLINE_SECONDS = 30.0


def wait_until(condition: Callable[[], T], what: str, timeout: float = DEADLINE_SECONDS) -> T:
    """Poll `condition` until it returns a truthy value (returned), or fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


async def wait_for(condition: Callable[[], T], what: str) -> T:
    """`wait_until` for async tests: polls without blocking the event loop the condition depends on."""
    with anyio.fail_after(DEADLINE_SECONDS):
        # Polling, not an Event: the conditions are other components' state, which signals nothing.
        while not (value := condition()):  # noqa: ASYNC110
            await anyio.sleep(0.02)
    return value
