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
