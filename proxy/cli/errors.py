"""How commands fail: a value the user can fix, or a check that found something to fix."""

from __future__ import annotations

# Exit status of a check that found something to fix (stale prices, drift from Anthropic's own figures).
DRIFT = 4


class UsageError(Exception):
    """A command-line value we cannot use."""
