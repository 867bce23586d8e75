"""A source collection's expiry (TTL), and what the target does about it: one state per namespace.

Status (`expiry`, `ttl_decision`, readiness), `cosmigrate indexes`, the index
plan, the cutover report and `cosmigrate plan` all read it from `ttl_state`,
so they cannot disagree.

- Until cutover, expired documents are deletes like any other: they vanish at
  the source without a change event, and the delete sweep removes them from
  the target (`cosmigrate.deletes`: a namespace that expires documents gets a
  pass every `deletes.interval_s` even when its head did not move, because
  expiry moves no head).
- After cutover the target must expire them itself. A TTL on a date field
  (EnableTtlOnCustomPath) is carried: built without its expiry, given it at
  cutover (`cosmigrate.indexplan`). A TTL on Cosmos's system field `_ts`
  cannot be carried: `_ts` is not a field of the documents. That is a
  decision the operator makes once per namespace, in the config's `[ttl]`
  table: `"db.coll" = "field:<date field>:<seconds>"` (a DocumentDB TTL index
  on a date field the application writes, built disabled, enabled at cutover)
  or `"db.coll" = "none"` (the target keeps documents without expiry). Until
  it is made, readiness is blocked with a reason that names both forms; once
  made it never blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from cosmigrate.config import TTL_FORMS, Config, TtlDecision
from cosmigrate.mongo import raw_collection

UNDECIDED = "undecided"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class TtlState:
    """What the source expires by, and the operator's decision for a `_ts` TTL."""

    ns: str
    ts_seconds: int | None = None
    """expireAfterSeconds of the source's TTL on `_ts`; None without one."""
    custom: tuple[tuple[str, int], ...] = ()
    """(date field, expireAfterSeconds) of the source's TTL indexes on a date field: carried at cutover."""
    decision: TtlDecision | None = None
    """The `[ttl]` entry for the namespace, if any (ignored without a `_ts` TTL)."""
    unknown: str = ""
    """Why the source's indexes could not be read: nothing can be said about expiry then."""

    @property
    def expires(self) -> bool:
        """The source deletes documents by time (or might: its indexes are unknown), without change events."""
        return self.ts_seconds is not None or bool(self.custom) or bool(self.unknown)

    @property
    def decision_text(self) -> str:
        """Status `ttl_decision`: "" (no `_ts` TTL), `undecided`, `unknown`, `none` or `field:<path>:<seconds>`."""
        if self.unknown:
            return UNKNOWN
        if self.ts_seconds is None:
            return ""
        return self.decision.text() if self.decision is not None else UNDECIDED

    @property
    def field_index(self) -> TtlDecision | None:
        """The decided date-field TTL the target gets in place of `_ts`, or None."""
        if self.ts_seconds is not None and self.decision is not None and self.decision.kind == "field":
            return self.decision
        return None

    def choice(self) -> str:
        """The two ways out of an undecided `_ts` TTL, with the exact key to set."""
        key = json.dumps(self.ns)
        return (f"decide in the config's [ttl] table: {key} = \"field:<date field>:<expireAfterSeconds>\" "
                f"(DocumentDB expires by a date field the application writes; the index is enabled at cutover) "
                f"or {key} = \"none\" (no expiry on the target), then `systemctl reload cosmigrate`")

    @property
    def blocking(self) -> str:
        """Why this namespace's expiry blocks readiness, or "" (no TTL, a carried one, or a decided `_ts`)."""
        if self.unknown:
            return f"{self.ns}: expiry unknown ({self.unknown})"
        if self.decision_text == UNDECIDED:
            return (f"{self.ns}: expires by _ts (expireAfterSeconds={self.ts_seconds}), which DocumentDB cannot "
                    f"carry; {self.choice()}")
        return ""

    def describe(self) -> str:
        """Status `expiry`: what the source expires by and what the target does about it; "" without a TTL."""
        if self.unknown:
            return f"unknown: {self.unknown}"
        parts: list[str] = []
        if self.ts_seconds is not None:
            head = f"TTL on the system field _ts (expireAfterSeconds={self.ts_seconds})"
            if self.decision is None:
                parts.append(f"{head}: DocumentDB cannot carry it; undecided: set [ttl] {json.dumps(self.ns)} = "
                             f"{TTL_FORMS} (see not_ready_reasons)")
            elif self.decision.kind == "none":
                parts.append(f"{head}: decided none: no expiry on the target after cutover")
            else:
                d = self.decision
                parts.append(f"{head}: decided {d.text()}: a TTL index on {d.path} (expireAfterSeconds={d.seconds}), "
                             "built without expiry, enabled at cutover")
        elif self.decision is not None:
            parts.append(f"[ttl] decision {self.decision.text()} ignored: the source has no TTL on _ts")
        parts += [f"TTL on {path} (expireAfterSeconds={seconds}): built without expiry, enabled at cutover"
                  for path, seconds in self.custom]
        if not parts:
            return ""
        if self.expires:
            parts.append("the delete sweep removes expired documents from the target until cutover")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The cutover report's and `cosmigrate plan`'s view (`ttl_on_ts`: the `_ts` TTL's seconds, or None)."""
        return {"ttl_on_ts": self.ts_seconds, "ttl_decision": self.decision_text,
                "custom_ttl": [{"field": path, "expire_after_seconds": s} for path, s in self.custom],
                "expiry": self.describe()}


def ttl_indexes(indexes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The TTL indexes among a collection's index specs (as `listIndexes` returns them), as plain dicts."""
    return [{"name": str(spec.get("name", "")), "key": dict(spec.get("key", {})),
             "expireAfterSeconds": int(spec["expireAfterSeconds"])}
            for spec in indexes if "expireAfterSeconds" in spec]


def ttl_state(ns: str, indexes: Iterable[Mapping[str, Any]], cfg: Config, unknown: str = "") -> TtlState:
    """A namespace's TTL state and decision from its source index specs and the config (reads nothing).

    `unknown`: why the indexes could not be read (the state then blocks readiness: expiry is not known)."""
    ts: int | None = None
    custom: list[tuple[str, int]] = []
    for spec in ttl_indexes(indexes):
        path = next(iter(spec["key"]), "")
        if path == "_ts":
            ts = spec["expireAfterSeconds"]
        else:
            custom.append((path, spec["expireAfterSeconds"]))
    return TtlState(ns, ts, tuple(custom), cfg.ttl.get(ns), unknown)


async def read_ttl_indexes(source: Any, ns: str) -> tuple[list[dict[str, Any]], str]:
    """The source collection's TTL indexes, or ([], why) when they cannot be read (transient errors raise:
    the caller retries)."""
    try:
        return ttl_indexes([dict(spec) async for spec in await raw_collection(source, ns).list_indexes()]), ""
    except (ConnectionFailure, OperationFailure) as exc:
        if isinstance(exc, ConnectionFailure) or exc.code in (16500, 50):
            raise
        if exc.code == 26:  # dropped at the source: no expiry left to mirror
            return [], ""
        return [], f"the source's indexes could not be read ({type(exc).__name__})"
    except PyMongoError as exc:
        return [], f"the source's indexes could not be read ({type(exc).__name__})"


__all__ = ["TTL_FORMS", "UNDECIDED", "TtlState", "read_ttl_indexes", "ttl_indexes", "ttl_state"]
