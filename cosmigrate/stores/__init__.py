"""Batch stores, chosen by URL: `s3://bucket/prefix` or `file:///path`."""

from __future__ import annotations

from urllib.parse import urlsplit

from cosmigrate.config import Config
from cosmigrate.stores.base import APPLIED_TAG_KEY, APPLIED_TAG_VALUE, BatchStore, ObjectMissing, StoreError, batch_key

__all__ = ["APPLIED_TAG_KEY", "APPLIED_TAG_VALUE", "BatchStore", "ObjectMissing", "StoreError", "batch_key", "open_store",
           "store_prefix"]



def store_prefix(url: str) -> str:
    """The key prefix inside the store (S3 path part; empty for a directory)."""
    parts = urlsplit(url)
    return parts.path.strip("/") if parts.scheme == "s3" else ""


def open_store(cfg: Config) -> BatchStore:
    """Build the store named by `store.url` (validated by the config loader)."""
    url = cfg.store.url
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from cosmigrate.stores.s3 import S3Store

        return S3Store(url, parts.netloc, parts.path, region=cfg.aws.region, endpoint_url=cfg.aws.endpoint_url,
                       sse=cfg.store.sse, kms_key_id=cfg.store.kms_key_id)
    from cosmigrate.stores.local import LocalStore

    return LocalStore(url, parts.path, retention_hours=cfg.store.retention_hours)
