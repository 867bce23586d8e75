"""The TTL decision shown by `cosmigrate plan`, in one place.

What cosmigrate decides for a source TTL index (mirror it, ask the user, ...)
is being built separately; until it is, the plan shows each TTL index with
"decision: unknown (not built yet)" rather than a guess. Point `decision` at
the real decision when it lands: nothing else in the plan changes.
"""

from __future__ import annotations

from cosmigrate.indexes import IndexReport

NOT_BUILT = "unknown (not built yet)"


def decision(report: IndexReport) -> str:
    """What cosmigrate will do about this TTL index (only asked for TTL indexes)."""
    return NOT_BUILT
