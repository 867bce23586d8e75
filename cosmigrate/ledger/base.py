"""The checkpoint ledger interface and its records.

The ledger is the source of truth for what has been captured and applied:
a batch exists for readers only once its commit succeeded, and a commit
succeeds only when the namespace's `next_seq` equals the batch's seq AND the
committing process still holds the namespace's epoch (docs/design.md,
invariants 2 and 4). Implementations: SQLite (one transaction) and DynamoDB
(TransactWriteItems).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import bson


class LedgerError(Exception):
    """The ledger could not be reached or refused an operation.

    Every failure of a ledger method is one of these (never a raw botocore or
    sqlite3 exception), so callers need one `except` to retry or report.
    """


class LedgerUnavailable(LedgerError):
    """A transient failure (throttling, 5xx, network) outlasted the ledger's own retries.

    The operation may or may not have taken effect; calling it again is safe
    because every write is conditional and recognises its own earlier success.
    """


class Fenced(LedgerError):
    """Another process took the namespace over (its epoch is newer): stop writing."""


class SeqConflict(LedgerError):
    """The namespace's next_seq is not the seq being committed (should never happen)."""


@dataclass
class NamespaceMeta:
    ns: str
    owner: str = ""
    epoch: int = 0
    next_seq: int = 0
    resume_token: bytes | None = None
    applied_seq: int = -1
    captured_events: int = 0
    applied_events: int = 0
    state: str = "running"
    last_error: str = ""
    updated_at: float = 0.0


@dataclass
class BatchRecord:
    ns: str
    seq: int
    key: str
    events: int
    bytes: int
    raw_bytes: int
    checksum: str
    first_captured_at: float
    captured_at: float
    applied_at: float | None = None
    epoch: int = 0
    """The committing owner's epoch (audit trail for fencing)."""


class ProgressConflict(LedgerError):
    """A progress item's version is not the one the writer read (someone else moved it on)."""


@dataclass
class Progress:
    """A generic resumable-work item: sweep progress, verification results, the cutover step.

    Keyed `(ns, kind, key)`; `ns` is "" for cluster-wide items. `data` is one
    BSON document (raw `_id` bounds stay raw), `version` counts its writes.
    """

    ns: str
    kind: str
    key: str
    data: bytes
    version: int = 1
    updated_at: float = 0.0

    def doc(self) -> dict[str, Any]:
        return dict(bson.decode(self.data))


@dataclass
class WriterControl:
    writer: str = "stopped"
    changed_by: str = ""
    changed_at: float = 0.0


class Ledger(Protocol):
    url: str

    async def init(self) -> list[str]:
        """Describe the table/file, create it if missing (`cosmigrate ledger init`); lines for the operator.

        An existing ledger is only described and checked, so that init needs no more
        permissions than the daemon has (no CreateTable when the stack made the table).
        """

    async def check(self) -> None:
        """Raise LedgerError with a helpful message if the ledger is unusable."""

    async def claim(self, ns: str, owner: str) -> NamespaceMeta:
        """Take the namespace: bump its epoch, record the owner; create it if new."""

    async def set_start_token(self, ns: str, epoch: int, token: bytes) -> bool:
        """Record the first start position, only if none is stored yet; False if another one was.

        True also when `token` itself is already stored: our earlier call whose answer was lost.
        """

    async def commit_batch(self, ns: str, epoch: int, record: BatchRecord, resume_token: bytes) -> None:
        """Commit a batch already put in the store; raises Fenced or SeqConflict.

        Returns normally if this very batch (same seq and checksum, my epoch) is
        already committed: our earlier call whose answer was lost.
        """

    async def set_state(self, ns: str, epoch: int, state: str, error: str = "") -> None:
        """Record the namespace's state (running, failed, ...); raises Fenced."""

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        """One namespace's meta, or None."""

    async def list_namespaces(self) -> list[NamespaceMeta]:
        """Every namespace of the cluster, sorted by name."""

    async def list_batches(self, ns: str, start_seq: int = 0, limit: int | None = None) -> list[BatchRecord]:
        """Committed batches of a namespace from `start_seq`, in seq order."""

    async def mark_applied(self, ns: str, epoch: int, old_applied_seq: int, new_applied_seq: int, events: int,
                           applied_at: float) -> None:
        """Advance applied_seq from exactly `old_applied_seq` and add `events` to applied_events.

        Raises Fenced if the stored epoch is not `epoch` (an applier that lost its
        namespace must not move applied_seq), SeqConflict if applied_seq is neither
        `old_applied_seq` nor already `new_applied_seq` (the latter is our own
        earlier call whose answer was lost: it returns without counting twice).
        """

    async def get_control(self) -> WriterControl:
        """The cluster's writer switch (stopped until an operator starts it)."""

    async def set_writer(self, writer: str, changed_by: str, changed_at: float) -> WriterControl:
        """Flip the writer switch; it survives restarts."""

    async def get_first_discovery(self) -> float:
        """When the cluster's first namespace discovery completed; 0.0 if it never did.

        A collection first seen after this moment was created while the cluster
        ran, so the daemon captures it from the beginning of its feed.
        """

    async def set_first_discovery(self, at: float) -> float:
        """Record `at` unless a time is already recorded; return the stored time (idempotent)."""

    async def get_progress(self, ns: str, kind: str, key: str) -> Progress | None:
        """One progress item, or None."""

    async def list_progress(self, ns: str, kind: str, prefix: str = "", limit: int | None = None) -> list[Progress]:
        """The progress items of `(ns, kind)` whose key starts with `prefix`, in key order."""

    async def put_progress(self, ns: str, kind: str, key: str, data: bytes, *, epoch: int | None,
                           expect_version: int | None = None) -> None:
        """Write a progress item (its version goes up by one).

        Fenced: with `epoch`, only while the namespace's stored epoch is `epoch`
        (raises Fenced otherwise); cluster items (`ns` "") pass None and rely on
        `expect_version`: the stored version must be exactly that (0: absent),
        else ProgressConflict. A repeat of a write whose answer was lost (same
        data, already at `expect_version + 1`) is done, not a conflict.
        """

    async def delete_progress(self, ns: str, kind: str, key: str, *, epoch: int | None) -> None:
        """Remove a progress item (absent is fine); fenced like `put_progress`."""

    async def purge(self, ns: str | None, *, dry_run: bool = False) -> dict[str, int]:
        """Remove a namespace's items (meta, batches, progress), or with `ns` None every item of the cluster
        (`cosmigrate ledger reset` / `drop-cluster`); the counts per kind ({"namespaces", "batches", "progress",
        "control"}). `dry_run` only counts. Unfenced: the caller checks first that no daemon holds them
        (`cosmigrate.ledgeradmin.holder`). The meta goes last, so a purge cut short can be run again."""

    async def close(self) -> None:
        """Release the connection."""
