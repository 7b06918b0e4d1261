"""Pre-flight rules for a Messages request: the model allow-list and the output cap (its worst-case cost is
`proxy/pricing/estimate.py`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.errors import ModelNotAllowed, OutputCapExceeded
from proxy.types import CapPolicy

# Extended thinking requires budget_tokens >= 1024 and < max_tokens.
MIN_THINKING_BUDGET = 1_024
# A call clamped at the budget edge keeps at least this much room to answer; with less it is refused instead (an
# answer cut off after a few tokens costs money and helps nobody).
MIN_EDGE_TOKENS = 1_024


@dataclass(frozen=True, slots=True, kw_only=True)
class CappedRequest:
    """The request as it will be sent: its body (rewritten only when clamped) and its `max_tokens`."""

    body: bytes
    max_tokens: int | None


def check_model(model: str | None, allowed: tuple[str, ...] | None, team: str) -> None:
    """Raise `ModelNotAllowed` unless the team's allow-list (None: everything) admits the model."""
    if allowed is None or model in allowed:
        return
    raise ModelNotAllowed(
        f"Team {team} may not use model {model!r}. Allowed models: {', '.join(allowed)}. "
        "Ask your spendgate admin to change the team's allow-list."
    )


def cap_output(request: dict[str, Any], body: bytes, *, cap: int | None, policy: CapPolicy, team: str) -> CappedRequest:
    """Apply the output cap: pass, clamp `max_tokens` (and a thinking budget above it), or raise `OutputCapExceeded`."""
    max_tokens = request.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return CappedRequest(body=body, max_tokens=None)
    if cap is None or max_tokens <= cap:
        return CappedRequest(body=body, max_tokens=max_tokens)
    if policy == "reject":
        raise OutputCapExceeded(
            f"max_tokens {max_tokens} is above team {team}'s output cap of {cap}. Send max_tokens <= {cap}."
        )
    clamped = dict(request, max_tokens=cap)
    thinking = request.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict) and isinstance(budget, int) and budget >= cap:
        if cap <= MIN_THINKING_BUDGET:
            raise OutputCapExceeded(
                f"Team {team}'s output cap of {cap} tokens leaves no room for extended thinking, whose budget must "
                f"be at least {MIN_THINKING_BUDGET} and below max_tokens. Disable thinking or ask for a higher cap."
            )
        # Keep half the capped output for the answer itself, as the thinking docs advise.
        clamped["thinking"] = dict(thinking, budget_tokens=max(MIN_THINKING_BUDGET, cap // 2))
    return CappedRequest(body=json.dumps(clamped, separators=(",", ":")).encode(), max_tokens=cap)


def most_tokens_within(worst: Callable[[int], Decimal | None], left: Decimal, *, below: int) -> int | None:
    """The largest `max_tokens` under `below`, and at least `MIN_EDGE_TOKENS`, whose worst case (`worst`, which
    grows with `max_tokens`) is within `left`; None when even the floor costs more.

    The worst case grows by the output price per token, so one step from the floor says where the answer is: a
    few estimates, not a search's dozens (each walks the whole request, on the event loop). The answer is
    checked, and searched for only if the worst case did not grow in steps."""
    low, high = MIN_EDGE_TOKENS, below - 1
    floor = worst(low)
    if high < low or floor is None or floor > left:
        return None
    step = worst(low + 1)
    if step is not None and step > floor:
        guess = min(high, low + int((left - floor) / (step - floor)))
        if _within(worst(guess), left) and (guess == high or not _within(worst(guess + 1), left)):
            return guess
    while low < high:
        middle = (low + high + 1) // 2
        if _within(worst(middle), left):
            low = middle
        else:
            high = middle - 1
    return low


def _within(cost: Decimal | None, left: Decimal) -> bool:
    return cost is not None and cost <= left
