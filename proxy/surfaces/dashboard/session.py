"""Dashboard sessions: the admin token entered once, exchanged for a signed cookie.

The cookie holds only its expiry and an HMAC of it, under a key derived from the admin token: every replica
accepts it without shared state, and rotating the admin token signs everyone out. Sign-in attempts are rate
limited per client address, in each process.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict

COOKIE = "spendgate_session"
SESSION_SECONDS = 8 * 3600
# Sign-in attempts per client address: a burst of this many, then one more every `REFILL_SECONDS`.
ATTEMPTS = 5
REFILL_SECONDS = 12.0
# Addresses remembered at most; the least recently seen are forgotten first.
MAX_CLIENTS = 10_000


class Sessions:
    """Makes and checks session cookies for one admin token."""

    def __init__(self, admin_token: str) -> None:
        self._token = admin_token.encode()
        self._key = hmac.new(self._token, b"spendgate dashboard session v1", hashlib.sha256).digest()

    def token_matches(self, given: str) -> bool:
        """Whether `given` is the admin token (in constant time)."""
        return hmac.compare_digest(given.encode(), self._token)

    def issue(self, now: float) -> str:
        """A cookie value valid for `SESSION_SECONDS` from `now` (a Unix time)."""
        expires = str(int(now) + SESSION_SECONDS)
        return f"{expires}.{self._sign(expires)}"

    def valid(self, cookie: str | None, now: float) -> bool:
        """Whether `cookie` was issued under this token and has not expired."""
        if not cookie:
            return False
        expires, _, signature = cookie.partition(".")
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            return False
        # Bytes: compare_digest refuses non-ASCII text, and a cookie is whatever the client sends.
        given = signature.encode("utf-8", "replace")
        return hmac.compare_digest(given, self._sign(expires).encode()) and int(expires) > now

    def _sign(self, expires: str) -> str:
        return hmac.new(self._key, expires.encode(), hashlib.sha256).hexdigest()


class SignInLimiter:
    """A token bucket of sign-in attempts per client address."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def attempt(self, client: str, now: float) -> float:
        """Take one attempt for `client`; 0 when allowed, else the seconds until the next one is."""
        tokens, last = self._buckets.pop(client, (float(ATTEMPTS), now))
        tokens = min(float(ATTEMPTS), tokens + (now - last) / REFILL_SECONDS)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) * REFILL_SECONDS
        self._buckets[client] = (tokens - 1, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return 0.0
