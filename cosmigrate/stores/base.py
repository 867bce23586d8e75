"""The batch store interface: a flat key -> bytes object store.

Modelled on Litestream's replica client: a few verbs, no knowledge of what a
batch means. Keys are deterministic per (namespace, seq, owner epoch), see
`batch_key`: a retried put overwrites its own object, harmlessly, but a
fenced ("zombie") process can never overwrite an object that the namespace's
new owner committed under the same seq.
"""

from __future__ import annotations

import hashlib
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


MAX_COMPONENT_BYTES = 150
"""Longest key component (a directory or file name of a directory store): a name past it is hashed.

Three components, the seq part and a prefix of at most `config.MAX_PREFIX_BYTES` (512) stay under S3's
1,024-byte key limit, and each component stays well under the 255-byte file-name limit of Linux filesystems.
"""
_HASH_MARK = "~"  # never produced by key_component's escaping, so a hashed component is never an escaped name


def key_component(name: str) -> str:
    """One database, collection or cluster name as one key component: injective, bounded, never hidden.

    Names are whatever the source allows (MongoDB takes `..`, `a..b`, `.x`, 255 bytes of `é`), so:
    percent-encoding of everything but letters, digits and `-_.` (also `~`, which `quote` would keep);
    a leading dot escaped, so no component is `.`, `..` or a hidden file (the directory store's
    markers are hidden files); the empty name is a lone `~`; and a component longer than
    MAX_COMPONENT_BYTES keeps a readable head plus `~` and the SHA-256 of the name. Escaped
    components never contain `~`, so no two names share a component (short of a SHA-256 collision).
    """
    if not name:
        return _HASH_MARK
    text = quote(name, safe="-_.", errors="surrogatepass").replace("~", "%7E")
    if text.startswith("."):
        text = "%2E" + text[1:]
    if len(text) <= MAX_COMPONENT_BYTES:
        return text
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    head = text[: MAX_COMPONENT_BYTES - len(digest) - 1]
    cut = head.rfind("%", len(head) - 2)
    if cut >= 0:
        head = head[:cut]  # never half an escape
    return f"{head}{_HASH_MARK}{digest}"


def batch_key(prefix: str, cluster: str, ns: str, seq: int, epoch: int) -> str:
    """`<prefix>/<cluster>/<db>/<coll>/<seq, 12 digits>-e<epoch>`, each name part a `key_component`.

    The epoch suffix is what keeps a fenced owner from clobbering committed
    data: its late put lands beside the new owner's object, never on it.
    Distinct namespaces never share a key (`app...` and `shop...` included),
    and the key stays within S3's and the file system's limits whatever the names.
    """
    db, _, coll = ns.partition(".")
    parts = [key_component(p) for p in (cluster, db, coll)]
    head = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return f"{head}{'/'.join(parts)}/{seq:012d}-e{epoch}"
