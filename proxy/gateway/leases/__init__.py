"""Leases: how a process admits calls in memory against allowances the ledger shares between replicas.

A budget (dollars a team, key or end user may spend this period) and a rate limit (requests or tokens a team or
key may use per minute) are the same problem: an allowance every replica draws on, which no call may overrun, and
which a transaction per call would make the slowest part of the request path. Both are solved one way.

The words, once: a **hold** is what the ledger keeps against an allowance for something not yet known to be used
(a call in flight, or a lease); a **lease** is a part of an allowance one process holds to admit many calls
against it with no I/O. Budget leases are holds owned by a process (`budget_holds`, call id `lease-…`); rate
leases are rows of `rate_leases`. An **upkeep** runs once a second.

The lifecycle, the same for both kinds (`budget.py`, `rate.py`; their common policy in `policy.py`):
1. **Admit** (request path): a call takes its worst case from this process's lease, in memory. When the lease is
   short, one transaction grows it under the allowance's row locks, only while everything held and used stays
   within the allowance; calls short at the same time wait for that one grant (`waits.Turns`), at most
   `SPENDGATE_LEDGER_WAIT_SECONDS`. A grant is sized from the demand: the worst cases admitted over
   `HORIZON_SECONDS`, at least what the call needs, at most a `SHARE` of what the allowance has (so other replicas
   can lease too); rate leases use a shorter horizon and a smaller share (`policy.py` says why).
2. **Finish**: the call's actual use replaces its worst case: what it did not use is back in the lease.
3. **Upkeep** (one task, `Leases.keep`, a lane per kind): each lease is measured against its demand, given back
   down to the demand of a horizon once it holds more than twice that, and ended when unused for `IDLE_SECONDS`.
4. **Close** (a clean exit, once every record is written): every lease is given back.
5. **Death**: a process whose heartbeat stops is reaped by any replica (`proxy/ledger/instances.py`), and what it
   held counts as used, because its calls may have gone out: its budget leases become `interrupted` records at the
   amount held (corrected by a replay of its journal), its rate leases are dropped as consumed. A process that
   finds itself taken for dead `forget`s its leases and starts again from nothing.

Why neither can overrun: a lease is in the ledger before any call is admitted against it, and a process only
ever admits, against a lease, what the lease still has. So at every instant, what all replicas may still use is
within what the ledger has granted, which is within the allowance. The proofs for each kind are in their
ledger modules (`proxy/ledger/budgets.py`, `proxy/ledger/rates.py`).
"""
