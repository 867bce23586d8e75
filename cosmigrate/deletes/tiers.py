"""Tier 1: the delete preview, detected on the account at start.

Some Cosmos DB accounts can switch on delete events (a gated preview): the
change-stream pipeline may then ask for `operationType: "delete"` and the
events carry it. Whether an account has it is only known by asking: open a
stream with the preview's pipeline and see whether Cosmos accepts it (it
answers "Change stream must be followed by a match and then a project
stage" otherwise). The stream is closed at once; nothing is read from it.
"""

from __future__ import annotations

from typing import Any

from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure, PyMongoError

from cosmigrate.mongo import change_stream_tokens, open_change_stream, raw_collection

PREVIEW = "preview"
SWEEP = "sweep"


async def preview_available(source: Any, ns: str) -> bool | None:
    """True when the account accepts the delete-preview pipeline, False when it refuses it, None if it cannot be told."""
    coll = raw_collection(source, ns)
    try:
        tokens = await change_stream_tokens(source, ns)
        start = RawBSONDocument(tokens[0]) if len(tokens) == 1 else None
        stream = await open_change_stream(coll, start, deletes_preview=True, max_await_ms=50, batch_size=0)
        await stream.close()
        return True
    except OperationFailure as exc:
        text = str(exc.details.get("errmsg", "") if exc.details else exc)
        if exc.code == 2 and ("match" in text or "pipeline" in text.lower() or "project" in text):
            return False
        return None
    except (PyMongoError, ValueError):
        return None


def tier_name(preview: bool, sweep: bool) -> str:
    """What status shows as `deletes_tier` (the change-event lookup check is always on)."""
    tiers = [t for t, on in ((PREVIEW, preview), (SWEEP, sweep)) if on]
    return "+".join(tiers) if tiers else "none"
