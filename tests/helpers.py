"""Helpers for capture/apply tests: configs, a workload, and invariant checks."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from cosmigrate.batchfile import Batch, BatchCodec
from cosmigrate.config import Config, to_toml, validate
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import RAW
from cosmigrate.sandbox import ca_file_for_uri
from cosmigrate.sandbox.workload import Workload, rich_doc  # noqa: F401  (re-exported for tests)
from cosmigrate.stores import open_store
from cosmigrate.tls import connection_tls

BACKENDS = ["file+sqlite", "s3+dynamodb"]


def backends(default: str) -> list[str]:
    """The store+ledger pairs one long process test runs on: `default` in `make test`, both with
    COSMIGRATE_TEST_BACKENDS=all.

    Why not always both: each of these tests spends most of a minute waiting on leases, kills and children, and
    running every one twice kept `make test` over ten minutes. The defaults are spread so that each pair still
    has its own kill test and its own test of several workers; the ledgers' conditional writes themselves are
    tested on both pairs every time (tests/test_leases.py, tests/test_ledger_*.py)."""
    if default not in BACKENDS:
        raise ValueError(f"unknown backend {default!r}")
    return list(BACKENDS) if os.environ.get("COSMIGRATE_TEST_BACKENDS", "") == "all" else [default]


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def make_config(tmp_path: Path, source_uri: str, target_uri: str, backend: str, aws_endpoint: str | None = None,
                **capture: Any) -> Config:
    """A config on `file+sqlite` or `s3+dynamodb` (moto), unique per test."""
    cfg = Config(cluster_name="test")
    cfg.source.uri = source_uri
    cfg.target.uri = target_uri
    # A sandbox target serves TLS with a CA of its own: trusted the way production trusts DocumentDB's bundle.
    cfg.target.tls_ca_file = ca_file_for_uri(target_uri)
    if not cfg.target.tls_ca_file and not connection_tls(target_uri).secure:
        cfg.target.allow_insecure_tls = True  # a placeholder address that no test connects to
    cfg.control.socket = str(tmp_path / "control.sock")
    cfg.log.format = "json"
    if backend == "file+sqlite":
        cfg.store.url = f"file://{tmp_path / 'batches'}"
        cfg.ledger.url = f"sqlite://{tmp_path / 'ledger.db'}"
    else:
        assert aws_endpoint
        suffix = uuid.uuid4().hex[:10]
        cfg.store.url = f"s3://bucket-{suffix}/changes"
        cfg.ledger.url = f"dynamodb://ledger-{suffix}"
        cfg.aws.endpoint_url = aws_endpoint
        cfg.aws.region = "us-east-1"
    cfg.capture.start_at = "beginning"
    cfg.capture.discovery_interval_s = 0.5
    cfg.capture.max_batch_age_s = 0.3
    # No wait before an idle cut: tests that count captured events read every write as its own event (Cosmos
    # shows only a document's latest version when the feed is read later, as the idle cut's wait would).
    cfg.capture.min_batch_age_s = 0.0
    cfg.capture.max_await_ms = 200
    # Short leases (tests of several workers see takeovers within seconds); the fence wait follows the bound.
    cfg.leases.lease_s, cfg.leases.renew_s, cfg.leases.balance_s = 12.0, 3.0, 3.0
    cfg.apply.write_bound_s = 5.0
    for k, v in capture.items():
        setattr(cfg.capture, k, v)
    validate(cfg)
    return cfg


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(to_toml(cfg))
    return path


async def prepare_backends(cfg: Config) -> None:
    """Create the bucket (S3) and the ledger, as an operator would before `run`."""
    if cfg.store.url.startswith("s3://"):
        import aioboto3

        bucket = cfg.store.url.removeprefix("s3://").split("/")[0]
        async with aioboto3.Session().client("s3", endpoint_url=cfg.aws.endpoint_url, region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=bucket)
    ledger = open_ledger(cfg)
    try:
        await ledger.init()
    finally:
        await ledger.close()


@dataclass
class Committed:
    """Everything committed for one namespace, read back through the ledger and the store."""

    ns: str
    batches: list[Batch]
    objects: list[bytes]
    seqs: list[int]
    epochs: list[int]
    resume_token: bytes | None
    next_seq: int
    applied_seq: int = -1
    state: str = ""
    last_error: str = ""


async def read_committed(cfg: Config) -> dict[str, Committed]:
    ledger = open_ledger(cfg)
    store = open_store(cfg)
    codec = BatchCodec()
    out: dict[str, Committed] = {}
    try:
        for meta in await ledger.list_namespaces():
            records = await ledger.list_batches(meta.ns)
            objects = [await store.get(r.key) for r in records]
            batches = [codec.decode(o, expect_checksum=r.checksum) for o, r in zip(objects, records, strict=True)]
            out[meta.ns] = Committed(meta.ns, batches, objects, [r.seq for r in records], [r.epoch for r in records],
                                     meta.resume_token, meta.next_seq, meta.applied_seq, meta.state, meta.last_error)
    finally:
        await store.close()
        await ledger.close()
    return out


def id_of(doc: Any) -> bytes:
    return bson.encode({"_id": doc["_id"]})


async def source_docs(client: AsyncMongoClient, namespaces: list[str]) -> dict[str, dict[bytes, bytes]]:
    """Every live document of each namespace, raw, keyed by its encoded _id."""
    out: dict[str, dict[bytes, bytes]] = {}
    for ns in namespaces:
        db, _, coll = ns.partition(".")
        # RAW (DATETIME_AUTO): reading `_id` inflates the document, and a date outside years 1-9999 is valid BSON.
        c = client[db].get_collection(coll, codec_options=RAW)
        out[ns] = {id_of(d): bytes(d.raw) async for d in c.find()}
    return out


def check_committed(c: Committed, expected: dict[bytes, bytes] | None = None) -> dict[bytes, bytes]:
    """Assert the capture invariants for one namespace; return the last event per document."""
    assert c.seqs == list(range(len(c.seqs))), f"{c.ns}: seqs not gap-free: {c.seqs[:20]}"
    assert c.next_seq == len(c.seqs), f"{c.ns}: next_seq {c.next_seq} but {len(c.seqs)} batches"
    codec = BatchCodec()
    for batch, obj in zip(c.batches, c.objects, strict=True):
        again, _ = codec.encode(batch.header, batch.events)
        assert again == obj, f"{c.ns} seq {batch.header.seq}: batch does not round-trip byte for byte"
        assert batch.header.ns == c.ns and batch.header.count == len(batch.events)
    if c.batches:
        assert c.resume_token == bytes(c.batches[-1].header.resume_token.raw), \
            f"{c.ns}: ledger resume token differs from the last committed batch's"
    last: dict[bytes, bytes] = {}
    versions: dict[bytes, int] = {}
    for batch in c.batches:
        for raw in batch.events:
            event = RawBSONDocument(raw, RAW)
            key = bson.encode({"_id": event["documentKey"]["_id"]})
            full = event.get("fullDocument")
            if full is None:
                last.pop(key, None)
                continue
            v = full.get("v")
            if v is not None:
                assert v >= versions.get(key, -1), f"{c.ns}: document changes out of order ({versions[key]} then {v})"
                versions[key] = v
            last[key] = bytes(full.raw)
    if expected is not None:
        missing = set(expected) - set(last)
        assert not missing, f"{c.ns}: {len(missing)} documents never captured"
        stale = [k for k in expected if last[k] != expected[k]]
        assert not stale, f"{c.ns}: {len(stale)} documents captured at an old version"
    return last


async def wait_for(predicate: Any, limit_s: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll an async predicate until it returns a truthy value, or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    last_exc: Exception | None = None
    while loop.time() < deadline:
        try:
            result = await predicate()
            if result:
                return result
        except AssertionError as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {limit_s}s waiting for {what}" + (f": {last_exc}" if last_exc else ""))


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ENV)
    env.update(extra or {})
    return env


async def target_docs(client: AsyncMongoClient, namespaces: list[str]) -> dict[str, dict[bytes, bytes]]:
    return await source_docs(client, namespaces)


async def assert_converged(source: AsyncMongoClient, target: AsyncMongoClient, namespaces: list[str]) -> bool:
    """Target equals source document for document, byte for byte (types and field order)."""
    src = await source_docs(source, namespaces)
    dst = await target_docs(target, namespaces)
    for ns in namespaces:
        missing = set(src[ns]) - set(dst[ns])
        extra = set(dst[ns]) - set(src[ns])
        differ = [k for k in src[ns] if k in dst[ns] and src[ns][k] != dst[ns][k]]
        assert not (missing or extra or differ), \
            f"{ns}: {len(missing)} missing, {len(extra)} extra, {len(differ)} different on the target"
    return True
