"""Fault switches for the emulators, settable from `--faults`, Python, or the wire.

Tests flip these at run time (`sandbox.source.faults.throttle_rate = 0.3`), a
separate process can flip them with the `cosmigrateSandbox` command, and the
CLI takes a spec such as `throttle=0.2,retry_after_ms=50,deletes_preview`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, fields
from typing import Any


class FaultSpecError(ValueError):
    """A `--faults` spec that names an unknown switch or a bad value."""


@dataclass
class Faults:
    """Every switch is off by default: a fresh sandbox behaves like a healthy server."""

    # --- source (Cosmos DB) ---
    throttle_rate: float = 0.0
    """Share of data commands answered with 16500 TooManyRequests."""
    retry_after_ms: int = 20
    """The RetryAfterMs value carried by a throttling error."""
    empty_page_rate: float = 0.0
    """Share of change-stream pages served empty although changes are waiting."""
    drop_rate: float = 0.0
    """Share of commands whose connection is closed instead of answered."""
    idle_timeout_s: float = 0.0
    """Close connections idle longer than this (0 = never), like Cosmos after ~4 minutes."""
    reject_tokens: bool = False
    """Refuse every resume token ("Change feed token format is invalid")."""
    no_postbatch_token: bool = False
    """Leave out postBatchResumeToken, reproducing PyMongo's missing operationTime failure."""
    deletes_preview: bool = False
    """Accept "delete" in the change-stream $match and emit delete events."""
    refuse_change_streams: bool = False
    """Refuse every change stream, as an account without change-feed support would."""
    refuse_head_tokens: bool = False
    """Refuse GetChangeStreamTokens with Unauthorized (13), as a key without the permission would."""
    no_head_tokens: bool = False
    """Answer GetChangeStreamTokens with CommandNotFound, as an old account would."""
    refuse_collstats: bool = False
    """Refuse collStats with Unauthorized (13), as a user without the clusterMonitor-like read would be."""
    head_throttle_rate: float = 0.0
    """Share of GetChangeStreamTokens calls answered with 16500 (on top of throttle_rate)."""
    slow_head_ms: int = 0
    """Delay every GetChangeStreamTokens answer this long (a real round trip to Azure, or a busy account)."""
    slow_list_indexes_ms: int = 0
    """Delay every listIndexes (a loaded account answers the TTL read late)."""
    hold_list_indexes: bool = False
    """listIndexes waits while this is set (a test decides when the TTL read is answered)."""
    token_kind: int = 0
    """Resume-token form: 1 (`_kind: 1`, JSON), 4 (`_kind: 4`, gzip of the JSON), 0 = both mixed (real accounts)."""
    refuse_beginning_token: bool = False
    """Refuse the old LSN-"0" token form, as modern accounts may: the beginning only via GetChangeStreamTokens."""
    expire_tokens: bool = False
    """Answer every resume (and every getMore of an open stream) with InvalidOptions (72) "Expired resume token"."""
    server_side_retry_ms: int = 0
    """Server-side retry (DisableRateLimitingResponses): a throttled request waits up to this long for request
    units, then fails with ExceededTimeLimit (50) instead of 16500. 0 = off."""
    ru_per_s: float = 0.0
    """Request-unit budget per second of each collection (0 = unlimited): documents read and written are charged
    (see `sandbox.requestunits`); an exhausted budget throttles commands and empties change-stream pages."""
    idle_getmore_immediate: bool = False
    """Idle change-stream getMores answer at once instead of waiting maxAwaitTimeMS (Cosmos does not document it)."""
    unique_nested_docs: bool = False
    """The EnableUniqueCompoundNestedDocs capability: unique indexes also hold values under array paths."""
    ttl_custom_path: bool = False
    """The EnableTtlOnCustomPath capability: TTL indexes on a date field instead of only on `_ts`."""
    ttl_clock_advance_s: float = 0.0
    """TTL expiry runs this many seconds ahead of the wall clock (tests make documents expire without waiting)."""
    ttl_lazy_delete: bool = False
    """Expired documents vanish from every read at once but their delete is deferred (Cosmos deletes expired
    documents in the background, when request units allow): expiry does not move the head."""
    partitions: int = 1
    """Physical partitions of each source collection created from now on (each with its own LSN log and an even
    share of `ru_per_s` for its change-stream reads)."""
    collection_partitions: str = ""
    """Per-collection override of `partitions`: `db.coll:N` entries separated by `;` (e.g. `app.users:4;app.x:1`)."""

    # --- target (DocumentDB) ---
    failover_until: float = 0.0
    """Monotonic time until which the target acts as if failing over."""
    slow_write_ms: int = 0
    """Delay added to every write command."""
    slow_index_ms: int = 0
    """Delay every createIndexes (an index build on a large collection takes a while)."""

    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.rng.seed(self.seed)

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def failover(self, seconds: float) -> None:
        """Start a failover window of `seconds` from now."""
        self.failover_until = time.monotonic() + seconds

    @property
    def failing_over(self) -> bool:
        return time.monotonic() < self.failover_until

    def update(self, values: dict[str, Any]) -> None:
        """Set switches by name, converting types; unknown names are refused."""
        known = {f.name: f for f in fields(self) if f.name not in ("rng", "seed")}
        for name, raw in values.items():
            if name == "failover_s":
                self.failover(float(raw))
                continue
            if name not in known:
                raise FaultSpecError(f"unknown fault {name!r}; known: failover_s, {', '.join(sorted(known))}")
            current = getattr(self, name)
            try:
                value: Any
                if isinstance(current, str):
                    value = str(raw)
                elif isinstance(current, bool):
                    value = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on", "")
                elif isinstance(current, int):
                    value = int(raw)
                else:
                    value = float(raw)
            except (TypeError, ValueError) as exc:
                raise FaultSpecError(f"fault {name!r} needs a number, got {raw!r}") from exc
            setattr(self, name, value)

    def partitions_of(self, ns: str) -> int:
        """How many physical partitions a new collection `ns` gets (`collection_partitions`, else `partitions`)."""
        for entry in self.collection_partitions.split(";"):
            name, sep, count = entry.strip().rpartition(":")
            if sep and name == ns:
                try:
                    return max(1, int(count))
                except ValueError as exc:
                    raise FaultSpecError(f"collection_partitions entry {entry!r} needs db.coll:N") from exc
        return max(1, self.partitions)

    def snapshot(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rng"}


def parse_spec(spec: str) -> dict[str, Any]:
    """Parse `name=value,flag,...` into a dict (a bare name means true)."""
    out: dict[str, Any] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        out[name.strip()] = value.strip() if sep else True
    return out
