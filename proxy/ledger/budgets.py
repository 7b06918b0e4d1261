"""Budget holds in the ledger: a hold taken before a call goes out (its own, or a process's lease that covers many
calls, `proxy/gateway/leases/`), settled to its actual cost when it is recorded.

Every check-and-hold is one transaction holding the counters' row locks (`SELECT … FOR UPDATE` on
PostgreSQL, `BEGIN IMMEDIATE` on SQLite), so concurrent calls on any number of replicas see each other's
holds: never check-then-act. Arithmetic is `Decimal` in Python, exact on both databases. Holds of a process
that died are recorded by the heartbeat reaper; `release_expired` is the last resort.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, update

from proxy.errors import BudgetExceeded
from proxy.ledger.counters import (
    NO_USER,
    TOTAL_PERIOD_START,
    ZERO,
    CounterKey,
    lock_counters,
    mark_alerted,
    stub_counter,
    user_counter,
    write_counters,
)
from proxy.ledger.db import write_transaction
from proxy.ledger.rollup_reads import read
from proxy.ledger.schema import BudgetHold, Instance
from proxy.ledger.windows import WINDOW_NAMES, period_end, period_start, reset_words, utc_instant
from proxy.types import Counter, Hold, HoldOwner, Period, UsageRecord

# A process's budget leases are holds whose call id starts with this (`proxy/gateway/leases/budget.py`).
LEASE_PREFIX = "lease-"


@dataclass(frozen=True, slots=True, kw_only=True)
class SoftLimitCrossed:
    """A budget went past its soft-limit fraction in this period (reported once per period)."""

    label: str
    period: Period
    period_start: datetime
    spent_usd: Decimal
    budget_usd: Decimal
    fraction: Decimal


def recount(engine: Engine, counter: Counter, where: dict[str, str]) -> None:
    """Set a counter's spend from the usage totals it covers (`where`: the team or key, as `rollup_reads.read` takes
    it), after a period change or a reprice, keeping its holds."""
    with write_transaction(engine) as connection:
        # Lock first: a settlement committing between the sum and the write would otherwise be lost.
        current = lock_counters(connection, [counter])
        found = read(connection, groups=[], measures=["cost_usd"], since=counter.period_start, until=None, where=where)
        spent = next(iter(found.values()), {}).get("cost_usd") or ZERO
        _, reserved = current[(counter.scope, counter.period_start)]
        write_counters(connection, [(counter.scope, counter.period_start, spent, reserved)])


def recount_users(engine: Engine, team_id: int, team: str, period: Period, at: datetime) -> None:
    """Set every end user's counter of a team from the usage totals of the current period (when end-user budgets
    are turned on or changed mid-period, or costs were corrected), keeping their holds."""
    start = period_start(period, at) or TOTAL_PERIOD_START

    def spent_by_user(connection: Connection) -> dict[str, Decimal]:
        found = read(connection, groups=["user"], measures=["cost_usd"], since=start, until=None, where={"team": team})
        return {NO_USER if user is None else user: totals["cost_usd"] or ZERO for (user,), totals in found.items()}

    with write_transaction(engine) as connection:
        users = sorted(spent_by_user(connection))
        counters = {user: user_counter(team_id, team, user, period, None, at) for user in users}
        # Lock first, then sum: a settlement committing between the sum and the write would otherwise be lost.
        current = lock_counters(connection, counters.values())
        spent = spent_by_user(connection)
        writes = []
        for user, counter in counters.items():
            _, reserved = current[(counter.scope, counter.period_start)]
            writes.append((counter.scope, counter.period_start, spent.get(user, ZERO), reserved))
        write_counters(connection, writes)


def take_hold(
    engine: Engine,
    hold: Hold,
    *,
    expires_at: datetime,
    started_at: datetime | None = None,
    owner: HoldOwner | None = None,
) -> None:
    """Hold `hold.amount` on every budgeted counter, or raise `BudgetExceeded` and hold nothing."""
    budgeted = [(counter, counter.budget_usd) for counter in hold.counters if counter.budget_usd is not None]
    amount = hold.amount
    with write_transaction(engine) as connection:
        current = lock_counters(connection, [counter for counter, _ in budgeted])
        short = [
            (budget - spent - reserved, counter, budget, spent, reserved)
            for counter, budget in budgeted
            for spent, reserved in (current[(counter.scope, counter.period_start)],)
            if spent + reserved + amount > budget
        ]
        if short:
            raise _refusal(amount, *min(short, key=lambda item: item[0]))
        writes = []
        for counter, _ in budgeted:
            spent, reserved = current[(counter.scope, counter.period_start)]
            writes.append((counter.scope, counter.period_start, spent, reserved + amount))
        write_counters(connection, writes)
        connection.execute(
            insert(BudgetHold),
            [
                {
                    "call_id": hold.call_id,
                    "scope": counter.scope,
                    "period_start": counter.period_start,
                    "amount_usd": amount,
                    "expires_at": expires_at,
                    "started_at": started_at,
                    **(asdict(owner) if owner is not None else {}),
                }
                for counter, _ in budgeted
            ],
        )


def release(engine: Engine, call_ids: Sequence[str]) -> None:
    """Take back the holds of calls that never went out (blocking): a hold that landed after its call was refused."""
    with write_transaction(engine) as connection:
        _unhold(connection, call_ids)


def settle(
    connection: Connection,
    records: Sequence[UsageRecord],
    *,
    soft_fraction: Decimal,
    release: Sequence[str] = (),
) -> list[SoftLimitCrossed]:
    """Add each record's cost to its counters and release the holds of `release` (call ids), in the caller's
    transaction. Releasing is idempotent: a hold already released releases nothing.

    Returns the soft limits these costs crossed, each marked on its counter so it is reported once per period.
    """
    spent: dict[CounterKey, Decimal] = defaultdict(Decimal)
    counters: dict[CounterKey, Counter] = {}
    for record in records:
        if record.hold is None:
            continue
        for counter in record.hold.counters:
            counters[(counter.scope, counter.period_start)] = counter
            spent[(counter.scope, counter.period_start)] += record.cost_usd or ZERO
    released = _release(connection, sorted(set(release)))
    current = lock_counters(connection, [*counters.values(), *(stub_counter(key) for key in released)])
    # Calls admitted under a lease: their cost moves from the lease to spent.
    for key, amount in _consume(connection, records).items():
        released[key] += amount
    crossed, writes = [], []
    for key in sorted(current):
        before, reserved = current[key]
        after = before + spent.get(key, ZERO)
        writes.append((key[0], key[1], after, max(reserved - released.get(key, ZERO), ZERO)))
        source = counters.get(key)
        budget = source.budget_usd if source is not None else None
        if source is None or not budget or not before < budget * soft_fraction <= after:
            continue
        if mark_alerted(connection, key):
            crossed.append(
                SoftLimitCrossed(
                    label=source.label,
                    period=source.period,
                    period_start=source.period_start,
                    spent_usd=after,
                    budget_usd=budget,
                    fraction=soft_fraction,
                )
            )
    write_counters(connection, writes)
    return crossed


def grant_lease(
    engine: Engine,
    lease_id: str,
    counters: Sequence[Counter],
    size: Callable[[Decimal], Decimal],
    *,
    owner: HoldOwner,
    now: datetime,
    expires_at: datetime,
) -> Decimal:
    """Grow a process's budget lease on every budgeted counter by `size(left)`, where `left` is the least any of
    them has left (budget - spent - held), under the counters' locks; returns the amount granted (zero when
    `size` says so). The lease is a hold like a call's (`budget_holds`, owned by the process), so spent +
    held <= budget keeps holding for every counter, whoever leases or holds."""
    budgeted = [counter for counter in counters if counter.budget_usd is not None]
    with write_transaction(engine) as connection:
        current = lock_counters(connection, budgeted)
        left = min(
            counter.budget_usd - sum(current[(counter.scope, counter.period_start)], ZERO)
            for counter in budgeted
            if counter.budget_usd is not None
        )
        grant = min(size(left), left)
        if grant <= 0:
            return ZERO
        query = select(BudgetHold.scope, BudgetHold.amount_usd).where(BudgetHold.call_id == lease_id)
        held = {scope: amount for scope, amount in connection.execute(query)}
        for counter in budgeted:
            spent, reserved = current[(counter.scope, counter.period_start)]
            write_counters(connection, [(counter.scope, counter.period_start, spent, reserved + grant)])
            if counter.scope in held:
                connection.execute(
                    update(BudgetHold)
                    .where(BudgetHold.call_id == lease_id, BudgetHold.scope == counter.scope)
                    .values(amount_usd=held[counter.scope] + grant, expires_at=expires_at)
                )
            else:
                connection.execute(
                    insert(BudgetHold).values(
                        call_id=lease_id,
                        scope=counter.scope,
                        period_start=counter.period_start,
                        amount_usd=grant,
                        expires_at=expires_at,
                        started_at=now,
                        **asdict(owner),
                    )
                )
        return grant


def return_lease(engine: Engine, lease_id: str, amount: Decimal | None) -> None:
    """Give back `amount` of a lease on each of its counters, or all of it (ending the lease) when None."""
    query = select(BudgetHold.scope, BudgetHold.period_start, BudgetHold.amount_usd).where(
        BudgetHold.call_id == lease_id
    )
    with write_transaction(engine) as connection:
        # The amounts are read again once the counters are locked: a settlement may have taken from them.
        current = lock_counters(
            connection, [stub_counter((scope, start)) for scope, start, _ in connection.execute(query)]
        )
        for scope, start, held in connection.execute(query):
            back = held if amount is None else min(amount, held)
            spent, reserved = current[(scope, start)]
            write_counters(connection, [(scope, start, spent, max(reserved - back, ZERO))])
            change = BudgetHold.call_id == lease_id, BudgetHold.scope == scope
            if amount is None:
                connection.execute(delete(BudgetHold).where(*change))
            else:
                connection.execute(update(BudgetHold).where(*change).values(amount_usd=held - back))


def end_leases(engine: Engine, instance: str) -> int:
    """Give back every lease of a process (at its clean exit, or once its journal has been replayed: by then each
    call it admitted has its own record). Returns how many leases ended (blocking)."""
    query = select(BudgetHold.call_id).where(
        BudgetHold.instance_id == instance, BudgetHold.call_id.startswith(LEASE_PREFIX)
    )
    with write_transaction(engine) as connection:
        leases = sorted(set(connection.execute(query).scalars()))
        _unhold(connection, leases)
    return len(leases)


def release_expired(engine: Engine, now: datetime, *, limit: int = 1000) -> int:
    """Release holds past their expiry whose process is not serving any more: the last resort, after the
    heartbeat reaper (`proxy/ledger/instances.py`). Returns how many calls' holds were released."""
    alive = select(Instance.id).where(Instance.id == BudgetHold.instance_id).exists()
    with write_transaction(engine) as connection:
        expired = connection.execute(
            select(BudgetHold.call_id).where(BudgetHold.expires_at < now, ~alive).limit(limit)
        ).scalars()
        call_ids = sorted(set(expired))
        if not call_ids:
            return 0
        _unhold(connection, call_ids)
        return len(call_ids)


# Run on every batch the writer writes, so built once (building it costs more than running it).
_CONSUME = (
    update(BudgetHold)
    .where(BudgetHold.call_id == bindparam("c_lease"), BudgetHold.scope == bindparam("c_scope"))
    .values(amount_usd=bindparam("c_left"))
)


def _unhold(connection: Connection, call_ids: Sequence[str]) -> None:
    """Delete the holds of these calls (or leases) and take what they held off their counters."""
    released = _release(connection, call_ids)
    current = lock_counters(connection, [stub_counter(key) for key in released])
    writes = []
    for key, amount in sorted(released.items()):
        spent, reserved = current[key]
        writes.append((key[0], key[1], spent, max(reserved - amount, ZERO)))
    write_counters(connection, writes)


def _release(connection: Connection, call_ids: Sequence[str]) -> dict[CounterKey, Decimal]:
    """Delete the holds of these calls; returns the amounts they held per counter (holds already expired are gone)."""
    released: dict[CounterKey, Decimal] = defaultdict(Decimal)
    if not call_ids:
        return released
    rows = connection.execute(
        delete(BudgetHold)
        .where(BudgetHold.call_id.in_(call_ids))
        .returning(BudgetHold.scope, BudgetHold.period_start, BudgetHold.amount_usd)
    )
    for scope, start, amount in rows:
        released[(scope, start)] += amount
    return released


def _consume(connection: Connection, records: Sequence[UsageRecord]) -> dict[CounterKey, Decimal]:
    """Take the costs of calls admitted under leases out of the leases; returns what left each counter's
    holds. A lease already ended (or reaped) gives nothing back: the cost is then only added to spent."""
    wanted: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for record in records:
        hold = record.hold
        if hold is None or hold.lease is None or not record.cost_usd or record.cost_usd < 0:
            continue
        for counter in hold.counters:
            wanted[(hold.lease, counter.scope)] += record.cost_usd
    freed: dict[CounterKey, Decimal] = defaultdict(Decimal)
    if not wanted:
        return freed
    rows = connection.execute(
        select(
            BudgetHold.call_id,
            BudgetHold.scope,
            BudgetHold.period_start,
            BudgetHold.amount_usd,
        ).where(BudgetHold.call_id.in_(sorted({lease for lease, _ in wanted})))
    )
    taken = []
    for lease, scope, start, held in rows:
        take = min(wanted.get((lease, scope), ZERO), held)
        if take <= 0:
            continue
        taken.append({"c_lease": lease, "c_scope": scope, "c_left": held - take})
        freed[(scope, start)] += take
    if taken:
        connection.execute(_CONSUME, taken)
    return freed


def _refusal(
    amount: Decimal, left: Decimal, counter: Counter, budget: Decimal, spent: Decimal, reserved: Decimal
) -> BudgetExceeded:
    """The refusal of a call that does not fit the window with the least left: which window, and when it resets."""
    end = period_end(counter.period, counter.period_start)
    window = reset_words(counter.period, end)
    headers = [(b"x-spendgate-budget-window", WINDOW_NAMES[counter.period].encode())]
    if end is not None:
        headers.append((b"x-spendgate-budget-resets-at", utc_instant(end).encode()))
    words = _period_words(counter.period)
    return BudgetExceeded(
        f"This call could cost up to ${_plain(amount)}, more than the {counter.label} has left {words} ({window}): "
        f"budget ${_plain(budget)}, spent ${_plain(spent)}, reserved by calls in flight ${_plain(reserved)}. "
        "Lower max_tokens, wait for the window to reset, or ask your spendgate admin to raise the budget.",
        headers=tuple(headers),
        left=max(left, ZERO),
    )


def _plain(amount: Decimal) -> str:
    return format(amount, "f")


def _period_words(period: Period) -> str:
    return "in total" if period == "total" else "today" if period == "day" else f"this {period}"
