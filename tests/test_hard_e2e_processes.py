"""The end-to-end run with every hard Cosmos switch on at once, with a real `cosmigrate run` process.

Load-dependent throttling (a request-unit budget per collection, so the
application's writes starve the daemon's reads), server-side retry (throttling
shows as a delayed ExceededTimeLimit), `_kind: 4` tokens only, an account that
refuses the old beginning token, idle getMores that return at once, random
throttles, sharded collections, bulk writes that partly succeed. Healthy
namespaces must converge; a sharded namespace whose documents share an `_id`
must fail visibly, naming both keys, and keep the cluster from being ready.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, InsertOne, ReplaceOne, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure

from cosmigrate.backoff import retry_after_s
from cosmigrate.sandbox import Sandbox
from tests.helpers import assert_converged, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child
from tests.test_readiness_processes import status

HEALTHY = ["app.users", "app.orders", "shop.items"]
SHARDED = {"app.orders": "tenant", "shop.items": "region", "shop.clash": "region"}
THROTTLED = (16500, 50)


class ThrottledWriter:
    """The application: unordered bulk writes against a throttled account, retrying what was refused."""

    def __init__(self, client: AsyncMongoClient, seed: int) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.versions: dict[tuple[str, int], int] = {}
        self.partial = 0  # bulk writes that partly succeeded before a throttle
        self.throttled = 0

    def _doc(self, ns: str, i: int, v: int) -> dict[str, Any]:
        doc: dict[str, Any] = {"_id": i}
        if ns in SHARDED:
            doc[SHARDED[ns]] = f"s{i % 5}"  # a shard key value never changes
        doc.update({"v": v, "f": self.rng.random(), "pad": "x" * self.rng.randint(50, 400)})
        return doc

    async def bulk(self, ns: str, ops: list[Any]) -> None:
        db, _, coll = ns.partition(".")
        pending = ops
        retry = False
        while pending:
            try:
                await self.client[db][coll].bulk_write(pending, ordered=False)
                return
            except BulkWriteError as exc:
                errors = exc.details["writeErrors"]
                # PyMongo sends an unordered bulk as one command per kind of write: a throttled update command
                # leaves the insert command's documents written, so a retried insert may find itself there.
                errors = [e for e in errors if not (retry and e["code"] == 11000
                                                    and isinstance(pending[e["index"]], InsertOne))]
                assert {e["code"] for e in errors} <= set(THROTTLED), errors[0]
                if len(errors) < len(pending):
                    self.partial += 1
                pending = [pending[e["index"]] for e in errors]
                delay = 0.05
            except OperationFailure as exc:
                assert exc.code in THROTTLED, exc
                delay = retry_after_s(exc)
            self.throttled += 1
            retry = True
            await asyncio.sleep(delay)

    async def run(self, rounds: int, keys: int = 300) -> None:
        for _ in range(rounds):
            for ns in HEALTHY:
                ops: list[Any] = []
                for i in self.rng.sample(range(keys), 60):
                    v = self.versions.get((ns, i), -1) + 1
                    self.versions[(ns, i)] = v
                    doc = self._doc(ns, i, v)
                    key = {k: doc[k] for k in ("_id", SHARDED.get(ns, "_id"))}
                    if v == 0:
                        ops.append(InsertOne(doc))
                    elif self.rng.random() < 0.5:
                        ops.append(ReplaceOne(key, doc))
                    else:
                        ops.append(UpdateOne(key, {"$set": {"v": v, "f": self.rng.random()}}))
                await self.bulk(ns, ops)


async def _converged(source: AsyncMongoClient, target: AsyncMongoClient) -> bool:
    """assert_converged, read through the same throttled account (a throttled read is simply asked again)."""
    try:
        return await assert_converged(source, target, HEALTHY)
    except OperationFailure as exc:
        if exc.code in THROTTLED:
            return False
        raise


async def test_every_hard_switch_at_once_converges_or_fails_visibly(tmp_path: Path, sandbox: Sandbox,
                                                                    source: AsyncMongoClient,
                                                                    target: AsyncMongoClient) -> None:
    for ns, key in SHARDED.items():
        await source.admin.command("shardCollection", ns, key={key: "hashed"})
    await source.shop.clash.insert_many([{"_id": 1, "region": "eu", "v": 0}, {"_id": 2, "region": "eu"}])
    writer = ThrottledWriter(source, seed=15)
    await writer.run(5)  # history, read from the beginning of the feed
    sandbox.source.faults.update({
        "ru_per_s": 1500, "server_side_retry_ms": 150, "throttle_rate": 0.02, "token_kind": 4,
        "refuse_beginning_token": True, "idle_getmore_immediate": True,
    })
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=200)
    cfg.capture.head_sample_interval_s = 0.5
    cfg.capture.discovery_interval_s = 1.0
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        await wait_for(lambda: status(config), 60, what="the daemon's control socket")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config),
                                                    "writer", "start")
        assert await proc.wait() == 0
        await writer.run(15)
        await writer.bulk("shop.clash", [InsertOne({"_id": 1, "region": "us", "v": 1})])  # shares _id 1 with "eu"
        assert writer.partial > 0 and writer.throttled > 0, "the load never throttled the application"
        await wait_for(lambda: _converged(source, target), 45, interval=1.0, what="convergence")

        async def settled() -> dict[str, Any] | None:
            st = await status(config)
            if not st:
                return None
            by_ns = {n["namespace"]: n for n in st["namespaces"]}
            healthy = all(by_ns[ns]["state"] == "running" and by_ns[ns]["pending_events"] == 0
                          and by_ns[ns]["freshness"] == "current" for ns in HEALTHY)
            return st if healthy and by_ns.get("shop.clash", {}).get("state") == "failed" else None

        st = await wait_for(settled, 45, interval=0.5, what="healthy namespaces current, shop.clash failed")
        clash = next(n for n in st["namespaces"] if n["namespace"] == "shop.clash")
        assert '{"region": "eu", "_id": 1}' in clash["last_error"] and '{"region": "us", "_id": 1}' in clash["last_error"]
        assert not st["ready_for_cutover"] and any("shop.clash" in r for r in st["not_ready_reasons"])
        await wait_for(lambda: _converged(source, target), 10, what="still converged")
        assert sandbox.source.throttled.get(50, 0) > 0  # server-side retry answered some of the daemon's requests
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
