"""Budget counters: what a budget counts (a team's, a key's or an end user's spend in one window, a calendar
period) and the one row per counter and period that holds it, locked in one order by everyone who changes it
(`budgets.py`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import Connection, Engine, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from proxy.ledger.keys import KeyInfo
from proxy.ledger.schema import BudgetCounter
from proxy.ledger.windows import counted, period_start
from proxy.types import Counter, Period, Windows

# `total` budgets never reset: one counter, dated at the epoch.
TOTAL_PERIOD_START = datetime(1970, 1, 1, tzinfo=UTC)
ZERO = Decimal(0)
CounterKey = tuple[str, datetime]
# How end-user budgets name the calls that carry no user identity: they share one allowance.
NO_USER = ""
# Counter keys per statement: well within SQLite's 32,766 parameters and PostgreSQL's 65,535.
CHUNK = 500
CounterWrite = tuple[str, datetime, Decimal, Decimal]  # scope, period start, spent, reserved


def counters_for(key: KeyInfo, at: datetime, user: str | None = None) -> tuple[Counter, ...]:
    """The budgets a call with this key counts against: its team's, its own, and its end user's in the team (calls
    without a user share the counter of `NO_USER`), one counter per window each (`windows.py`).

    Asked on every budgeted call, and the same for every call of a key and user in a UTC day (every window starts
    at midnight): made once per key (as the key cache has it), user and day."""
    name = user or NO_USER
    day = at.astimezone(UTC).date()
    cached = _MADE.get((id(key), name, day))
    if cached is not None and cached[0] is key:
        return cached[1]
    user_windows = key.user_budgets[name] if name in key.user_budgets else key.user_windows
    counters = (
        *team_counters(key.team_id, key.team, key.team_period, key.team_windows, at),
        *key_counters(key.key_id, key.key_period, key.key_windows, at),
        *user_counters(key.team_id, key.team, name, key.team_period, user_windows, at),
    )
    if len(_MADE) >= MAX_MADE:
        _MADE.clear()
    # The key itself is kept with them, so its id cannot name another key while the entry lives.
    _MADE[(id(key), name, day)] = (key, counters)
    return counters


# Counters made lately, by the key's identity, user and UTC day; cleared whole when full.
MAX_MADE = 10_000
_MADE: dict[tuple[int, str, date], tuple[KeyInfo, tuple[Counter, ...]]] = {}


def team_counters(team_id: int, name: str, period: Period, windows: Windows, at: datetime) -> tuple[Counter, ...]:
    """The counters of a team's budget windows for the periods containing `at`."""
    return tuple(team_counter(team_id, name, window, windows.get(window), at) for window in counted(windows, period))


def key_counters(key_id: str, period: Period, windows: Windows, at: datetime) -> tuple[Counter, ...]:
    """The counters of a key's own budget windows for the periods containing `at`."""
    return tuple(key_counter(key_id, window, windows.get(window), at) for window in counted(windows, period))


def user_counters(
    team_id: int, team: str, user: str, period: Period, windows: Windows, at: datetime
) -> tuple[Counter, ...]:
    """The counters of one end user's budget windows in a team (the team's period is their shorthand's)."""
    return tuple(
        user_counter(team_id, team, user, window, windows.get(window), at) for window in counted(windows, period)
    )


def user_counter(team_id: int, team: str, user: str, period: Period, budget: Decimal | None, at: datetime) -> Counter:
    """The counter of one end user's budget in a team in one window. Users are any string up to 256 characters, so
    the scope names them by digest."""
    digest = hashlib.sha256(user.encode()).hexdigest()[:32]
    label = f"user {user!r} of team {team}" if user else f"calls without a user of team {team}"
    return _counter(f"user:{team_id}:{digest}", label, period, budget, at)


def team_counter(team_id: int, name: str, period: Period, budget: Decimal | None, at: datetime) -> Counter:
    """The counter of a team's budget for the period containing `at`."""
    return _counter(f"team:{team_id}", f"team {name}", period, budget, at)


def key_counter(key_id: str, period: Period, budget: Decimal | None, at: datetime) -> Counter:
    """The counter of a key's own budget for the period containing `at`."""
    return _counter(f"key:{key_id}", f"key {key_id}", period, budget, at)


def _counter(scope: str, label: str, period: Period, budget: Decimal | None, at: datetime) -> Counter:
    return Counter(
        scope=f"{scope}:{period}",
        label=label,
        period=period,
        period_start=period_start(period, at) or TOTAL_PERIOD_START,
        budget_usd=budget,
    )


def current_spend(engine: Engine, counters: Iterable[Counter]) -> dict[str, tuple[Decimal, Decimal]]:
    """Spent and reserved per counter scope, as committed (no locks); zero for counters never used."""
    wanted = list(counters)
    found: dict[str, tuple[Decimal, Decimal]] = {counter.scope: (ZERO, ZERO) for counter in wanted}
    if not wanted:
        return found
    keys = sorted({(counter.scope, counter.period_start) for counter in wanted})
    with engine.connect() as connection:
        for chunk in _chunks(keys):
            query = select(BudgetCounter.scope, BudgetCounter.spent_usd, BudgetCounter.reserved_usd).where(
                tuple_(BudgetCounter.scope, BudgetCounter.period_start).in_(chunk)
            )
            for scope, spent, reserved in connection.execute(query):
                found[scope] = (spent, reserved)
    return found


def lock_counters(connection: Connection, counters: Iterable[Counter]) -> dict[CounterKey, tuple[Decimal, Decimal]]:
    """Create missing counter rows, then lock them all in one order (so two transactions never deadlock), in
    chunks a database takes as parameters however many counters there are (a team's end users)."""
    keys = sorted({(counter.scope, counter.period_start) for counter in counters})
    if not keys:
        return {}
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(
        dialect.insert(BudgetCounter).on_conflict_do_nothing(),
        [
            {"scope": scope, "period_start": start, "spent_usd": ZERO, "reserved_usd": ZERO, "soft_alerted": False}
            for scope, start in keys
        ],
    )
    locked = {}
    for chunk in _chunks(keys):
        rows = connection.execute(
            select(BudgetCounter.scope, BudgetCounter.period_start, BudgetCounter.spent_usd, BudgetCounter.reserved_usd)
            .where(tuple_(BudgetCounter.scope, BudgetCounter.period_start).in_(chunk))
            .order_by(BudgetCounter.scope, BudgetCounter.period_start)
            .with_for_update()
        )
        locked.update({(scope, start): (spent, reserved) for scope, start, spent, reserved in rows})
    return locked


def _chunks(keys: Sequence[CounterKey]) -> Iterator[Sequence[CounterKey]]:
    """Counter keys in order, a few hundred at a time (two parameters each)."""
    for first in range(0, len(keys), CHUNK):
        yield keys[first : first + CHUNK]


# Run on every batch the writer writes, so built once (building it costs more than running it).
_WRITE = (
    update(BudgetCounter)
    .where(BudgetCounter.scope == bindparam("w_scope"), BudgetCounter.period_start == bindparam("w_start"))
    .values(spent_usd=bindparam("w_spent"), reserved_usd=bindparam("w_reserved"))
)


def write_counters(connection: Connection, writes: Sequence[CounterWrite]) -> None:
    """Set the spent and reserved amounts of counters (locked by the caller), in one statement."""
    if writes:
        connection.execute(
            _WRITE,
            [
                {"w_scope": scope, "w_start": start, "w_spent": spent, "w_reserved": reserved}
                for scope, start, spent, reserved in writes
            ],
        )


def mark_alerted(connection: Connection, key: CounterKey) -> bool:
    result = connection.execute(
        update(BudgetCounter)
        .where(
            BudgetCounter.scope == key[0], BudgetCounter.period_start == key[1], BudgetCounter.soft_alerted.is_(False)
        )
        .values(soft_alerted=True)
    )
    return result.rowcount == 1


def stub_counter(key: CounterKey) -> Counter:
    return Counter(scope=key[0], label=key[0], period="total", period_start=key[1], budget_usd=None)
