"""The TTL decision shown by `cosmigrate plan`, in one place: `cosmigrate.ttl`'s, as the index report carries it.

A TTL on `_ts` has the operator's `[ttl]` decision (`undecided`, `none`,
`field:<path>:<seconds>`, `unknown`), read by `cosmigrate.indexes.read_indexes`
from `cosmigrate.ttl.ttl_state`, the same state status and the cutover use;
a TTL on a date field is carried (built without expiry, enabled at cutover).
"""

from __future__ import annotations

from cosmigrate.indexes import IndexReport

CARRIED = "carried: built without expiry, enabled at cutover"


def decision(report: IndexReport) -> str:
    """What cosmigrate will do about this TTL index (only asked for TTL indexes)."""
    if report.ttl == "_ts":
        return report.decision or "unknown"
    return CARRIED
