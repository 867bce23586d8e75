"""The batch store interface: a flat key -> bytes object store.

Modelled on Litestream's replica client: a few verbs, no knowledge of what a
batch means. Keys are deterministic per (namespace, seq, owner epoch), see
`batch_key`: a retried put overwrites its own object, harmlessly, but a
fenced ("zombie") process can never overwrite an object that the namespace's
new owner committed under the same seq.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import quote

APPLIED_TAG_KEY = "cosmigrate-applied"
APPLIED_TAG_VALUE = "true"
"""The S3 object tag that marks a batch as applied: the bucket's lifecycle rule expires only tagged objects."""


class StoreError(Exception):
    """A store operation that failed after the store's own retries."""


class ObjectMissing(StoreError):
    """The key does not exist in the store."""


class BatchStore(Protocol):
    """Where change batches live."""

    url: str

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` durably before returning (overwrite allowed)."""

    async def get(self, key: str) -> bytes:
        """Return the object's bytes; raises ObjectMissing."""

    async def delete(self, key: str) -> None:
        """Remove the object if present."""

    async def mark_applied(self, key: str) -> None:
        """Let the object expire: its batch is applied (called only after the ledger's applied_seq passed it).

        Until then an object must never expire: a committed batch is the only
        copy of its changes. S3 tags the object (`cosmigrate-applied=true`,
        what the bucket's lifecycle rule filters on); a directory leaves a
        marker and deletes files applied more than `store.retention_hours`
        ago. Raises ObjectMissing if the object is gone, StoreError otherwise
        (the caller tries again later; an object never marked is kept, not lost).
        """

    async def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    async def check(self) -> None:
        """Raise StoreError with a helpful message if the store is unusable."""

    async def close(self) -> None:
        """Release connections."""


def batch_key(prefix: str, cluster: str, ns: str, seq: int, epoch: int) -> str:
    """`<prefix>/<cluster>/<db>/<coll>/<seq, 12 digits>-e<epoch>`, each name part URL-quoted.

    The epoch suffix is what keeps a fenced owner from clobbering committed
    data: its late put lands beside the new owner's object, never on it.
    """
    db, _, coll = ns.partition(".")
    parts = [quote(p, safe="-_.") for p in (cluster, db, coll)]
    head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return f"{head}{'/'.join(parts)}/{seq:012d}-e{epoch}"
