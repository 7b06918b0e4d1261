"""The outcome of a call is one pure function of what happened: the rules as a table."""

from __future__ import annotations

import pytest

from proxy.errors import BudgetExceeded, UpstreamTimeout, UpstreamUnreachable
from proxy.gateway.call import Facts, decide_outcome

CASES = [
    pytest.param(Facts(status=200), ("ok", None), id="ok"),
    pytest.param(Facts(refusal=BudgetExceeded("x")), ("rejected", "budget_exceeded"), id="refused"),
    pytest.param(Facts(refusal=UpstreamTimeout("x")), ("upstream_unreachable", "upstream_timeout"), id="timeout"),
    pytest.param(
        Facts(refusal=UpstreamUnreachable("x")), ("upstream_unreachable", "upstream_unreachable"), id="unreachable"
    ),
    pytest.param(Facts(status=200, crashed=True), ("upstream_error", "internal_error"), id="our-bug"),
    pytest.param(Facts(status=200, interrupted=True, disconnected=True), ("interrupted", None), id="shutdown"),
    pytest.param(Facts(status=200, disconnected=True, complete=False), ("client_disconnected", None), id="left"),
    pytest.param(
        Facts(status=200, cut=UpstreamUnreachable("x")), ("upstream_unreachable", "upstream_unreachable"), id="cut"
    ),
    pytest.param(Facts(status=429, error_type="rate_limit_error"), ("upstream_error", "rate_limit_error"), id="429"),
    pytest.param(Facts(status=500), ("upstream_error", None), id="500-unreadable"),
    pytest.param(
        Facts(status=200, error_type="overloaded_error", complete=False),
        ("upstream_error", "overloaded_error"),
        id="error-event",
    ),
    pytest.param(Facts(status=200, complete=False), ("upstream_error", "incomplete_stream"), id="no-message-stop"),
    pytest.param(Facts(refusal=BudgetExceeded("x"), crashed=True), ("rejected", "budget_exceeded"), id="refusal-first"),
]


@pytest.mark.parametrize("facts, expected", CASES)
def test_outcome(facts: Facts, expected: tuple[str, str | None]) -> None:
    assert decide_outcome(facts) == expected
