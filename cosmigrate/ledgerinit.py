"""`cosmigrate ledger init`: describe what exists, create what is missing, prove the store takes a write.

Run on the instance under its role, it must succeed with the daemon's own
permissions: an existing table is described, never altered; the batch store
gets one probe object under `<prefix>/<cluster>/_preflight/` (written, read
back, deleted: the only key the role may delete), so a missing bucket or a
missing grant shows here, before `preflight` and the first start.
"""

from __future__ import annotations

from cosmigrate.config import Config
from cosmigrate.ledger import open_ledger
from cosmigrate.stores import StoreError, open_store, store_prefix

PROBE = b"cosmigrate ledger init probe\n"


def probe_key(cfg: Config, name: str) -> str:
    """A key under `<prefix>/<cluster>/_preflight/`: the role's only deletable keys (see core-resources.yaml)."""
    prefix = store_prefix(cfg.store.url)
    return f"{prefix + '/' if prefix else ''}{cfg.cluster_name}/_preflight/{name}"


async def init_ledger_and_store(cfg: Config) -> list[str]:
    lines: list[str] = []
    ledger = open_ledger(cfg)
    try:
        lines += await ledger.init()
    finally:
        await ledger.close()
    store = open_store(cfg)
    key = probe_key(cfg, "ledger-init")
    try:
        try:
            await store.check()
            await store.put(key, PROBE)
            if await store.get(key) != PROBE:
                raise StoreError(f"{cfg.store.url}: the probe object read back different bytes")
            await store.delete(key)
        except StoreError as exc:
            raise StoreError(f"batch store {cfg.store.url}: {exc} (the bucket comes from core-resources.yaml; the "
                             "role needs s3:PutObject and s3:GetObject under the prefix)") from None
    finally:
        await store.close()
    lines.append(f"batch store {cfg.store.url}: reachable; a probe object was written, read back and deleted ({key})")
    lines.append(f"ready: {cfg.ledger.url} and {cfg.store.url}")
    return lines
