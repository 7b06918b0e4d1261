"""The one policy both kinds of lease follow: how large a grant is, what a lease keeps, when it ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Generic, TypeVar

# The upkeep runs this often: what calls took between two upkeeps is the demand per second.
UPKEEP_SECONDS = 1.0
# A lease covers the demand of this many seconds, and is given back down to that once it holds twice as much.
HORIZON_SECONDS = 2
# A grant takes at most 1/SHARE of the allowance at once (other replicas lease too). Its inverse must be a finite
# decimal (2, 4, 5, 8, ...): dollars divided by it stay exact.
SHARE = 4
# Rate leases look one second ahead and take at most an eighth of a limit at once. An upkeep tops them up with the
# bucket's newest refill, which a call that arrived before it and waited for its turn may then take: the bucket's
# bound over a window slips by what refilled while that call waited. Small top-ups keep the slip inside the bound's
# margin; the 2 s and the quarter above let it out under load (a window 17 tokens over, on a busy machine).
RATE_HORIZON_SECONDS = 1
RATE_SHARE = 8
# A lease nobody used for this long ends (given back whole).
IDLE_SECONDS = 2.0
# Before an upkeep has measured the demand (a new lease, a burst), it is what was taken so far over at least this
# long: a lease that runs out grows with what was just admitted, so a cold start under load takes a few grants.
MIN_WINDOW_SECONDS = 0.1

N = TypeVar("N", int, Decimal)


def grant_size(floor: N, per_second: N, cap: N, *, horizon: int = HORIZON_SECONDS) -> N:
    """How much to ask the ledger for: the demand of a horizon, at most `cap` (a share of the allowance), never
    less than `floor` (what the calls asking need now)."""
    return max(floor, min(per_second * horizon, cap))


@dataclass(slots=True)
class Demand(Generic[N]):
    """What calls took of one lease lately: the measure every grant, give-back and end goes by."""

    zero: N  # of the lease's unit: 0 tokens or Decimal(0) dollars
    taken: N  # since the last upkeep
    per_second: N  # taken between the last two upkeeps
    measured_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def none(cls, zero: N) -> Demand[N]:
        """No demand yet, in the lease's unit (`0` or `Decimal(0)`)."""
        return cls(zero=zero, taken=zero, per_second=zero)

    def took(self, amount: N) -> None:
        """A call took `amount` (or used that much beyond what it took)."""
        self.taken += amount
        self.last_used = time.monotonic()

    def gave_back(self, amount: N) -> None:
        """A call admitted and then refused before it went out: it was no demand."""
        self.taken = max(self.taken - amount, self.zero)

    def measure(self) -> None:
        """At an upkeep: what was taken since the last one becomes the demand per second."""
        self.per_second, self.taken = self.taken, self.zero
        self.measured_at = time.monotonic()

    def recent(self) -> N:
        """The demand per second as known now: the last upkeep's, or, when more, what was taken since then over
        the time since (by a whole factor, not a division: money stays exact)."""
        window = max(time.monotonic() - self.measured_at, MIN_WINDOW_SECONDS)
        return max(self.per_second, self.taken * int(1 / window))

    def keep(self) -> N:
        """What a lease keeps for the calls to come: the demand of a horizon."""
        return self.per_second * HORIZON_SECONDS

    def idle(self, now: float) -> bool:
        """Whether no call used the lease for `IDLE_SECONDS`."""
        return now - self.last_used > IDLE_SECONDS
