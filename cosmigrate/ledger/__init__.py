"""Checkpoint ledgers, chosen by URL: `dynamodb://table` or `sqlite:///path`."""

from __future__ import annotations

from urllib.parse import urlsplit

from cosmigrate.config import Config
from cosmigrate.ledger.base import (
    BatchRecord,
    Fenced,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    NamespaceMeta,
    Progress,
    ProgressConflict,
    SeqConflict,
    WriterControl,
)

__all__ = [
    "BatchRecord", "Fenced", "Ledger", "LedgerError", "LedgerUnavailable", "NamespaceMeta", "Progress",
    "ProgressConflict", "SeqConflict", "WriterControl",
    "open_ledger",
]


def open_ledger(cfg: Config) -> Ledger:
    """Build the ledger named by `ledger.url` (validated by the config loader)."""
    parts = urlsplit(cfg.ledger.url)
    if parts.scheme == "dynamodb":
        from cosmigrate.ledger.dynamodb import DynamoLedger

        return DynamoLedger(cfg.ledger.url, parts.netloc, cfg.cluster_name, region=cfg.aws.region,
                            endpoint_url=cfg.aws.endpoint_url)
    from cosmigrate.ledger.sqlite import SqliteLedger

    return SqliteLedger(cfg.ledger.url, parts.path, cfg.cluster_name)
