"""Leases: how several workers share a cluster's units without a coordinator (docs/design.md, "Workers").

`records` reads and writes the lease and worker items (conditional writes on
their counter, on either ledger); `balance` decides, as a pure function of
what this worker observed, which leases to take or steal; `keeper` runs the
renew and balance loops and tells the daemon which units it gained or lost.
"""

from cosmigrate.leases.balance import Observed, Plan, plan
from cosmigrate.leases.keeper import LeaseKeeper, UnitEvents
from cosmigrate.leases.records import Held, LeaseRecord, LeaseTable, WorkerRecord

__all__ = ["Held", "LeaseKeeper", "LeaseRecord", "LeaseTable", "Observed", "Plan", "UnitEvents", "WorkerRecord", "plan"]
