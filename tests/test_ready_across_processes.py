"""READY judged over every unit of the cluster, from any worker (real `cosmigrate run` processes, both ledgers).

Two workers share the units. Each worker's `ctl status` must reach ready_for_cutover, and whenever it says so
the target equals the source (the source is quiet when asked). A write to a unit that the other worker holds
makes this worker not ready until the holder applied it; a holder frozen with SIGSTOP is not live, and this
worker says so within lease_s plus a margin.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.config import worker_socket
from cosmigrate.sandbox import Sandbox
from tests.helpers import assert_converged, backends, wait_for
from tests.test_capture_processes import Child
from tests.test_workers_processes import _setup, held_by, status, writer_start

PARTITIONS = {"app.p": 1, "app.q": 2, "shop.r": 1}
NAMESPACES = list(PARTITIONS)


def claims_done(st: dict) -> bool:
    return bool(st["ready_for_cutover"] and st["gap_in_seconds"] == 0
                and all(n["pending_batches"] == 0 for n in st["namespaces"]))


async def _converged(source: AsyncMongoClient, target: AsyncMongoClient) -> bool:
    try:
        return await assert_converged(source, target, NAMESPACES)
    except AssertionError:
        return False


@pytest.mark.parametrize("backend", backends("file+sqlite"))
async def test_every_worker_says_ready_only_when_the_target_equals_the_source(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    cfg, config = await _setup(request, backend, tmp_path, sandbox, source, PARTITIONS)
    for i, ns in enumerate(NAMESPACES):
        db, _, coll = ns.partition(".")
        await source[db][coll].insert_many([{"_id": k, "v": i} for k in range(50)])
    names = ["a", "b"]
    socks = {n: worker_socket(cfg.control.socket, n) for n in names}
    workers = {n: await Child.start(config, COSMIGRATE_WORKER=n) for n in names}
    try:
        for n in names:
            await wait_for(lambda n=n: status(socks[n]), 60, what=f"{n}'s control socket")
        await writer_start(socks["a"])

        async def spread() -> dict[str, list[str]]:
            held = held_by(await status(socks["a"]))
            assert len(held) == 2 and all(held.values()), held
            assert sorted(u for units in held.values() for u in units) == sorted(NAMESPACES), held
            return held

        await wait_for(spread, 90, interval=1.0, what="both workers holding some units")

        async def ready_on(name: str) -> dict:
            st = await status(socks[name])
            if claims_done(st):  # the source is quiet: READY at gap 0 with nothing pending must mean equal, now
                assert await assert_converged(source, target, NAMESPACES)
            assert claims_done(st), (name, st["not_ready_reasons"], st["gap_in_seconds"])
            return st

        for n in names:
            await wait_for(lambda n=n: ready_on(n), 120, interval=1.0, what=f"{n} to say ready_for_cutover")

        # A write on a unit worker b holds, while b's target writes are held by the target: a is not ready.
        st = await status(socks["a"])
        ids = {w["name"]: w["worker"] for w in st["workers"]}
        unit = sorted(held_by(st)[ids["b"]])[0]
        db, _, coll = unit.partition(".")
        sandbox.target.faults.slow_write_ms = 3000
        try:
            await source[db][coll].insert_one({"_id": "new", "v": 1})
            st = await status(socks["a"])
            if await _converged(source, target):
                print("b applied the write before a's status answered")
            else:  # not applied yet: a must not claim it (lag above 0 or batches pending, and not done)
                assert not claims_done(st), st
                row = next(n for n in st["namespaces"] if n["namespace"] == unit)
                assert row["lag_seconds"] > 0 or row["pending_batches"] > 0, row
                print(f"a while b's write of {unit} was held: lag {row['lag_seconds']}s, "
                      f"pending {row['pending_batches']}, ready {st['ready_for_cutover']}: {st['not_ready_reasons']}")
        finally:
            sandbox.target.faults.slow_write_ms = 0
        await wait_for(lambda: ready_on("a"), 120, interval=1.0, what="a ready again once b applied the write")

        # b frozen: a must stop vouching for b's units within lease_s plus a margin, and never say ready while the
        # target differs (a write made after the freeze cannot be applied by b).
        workers["b"].proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            await source[db][coll].insert_one({"_id": "frozen", "v": 1})
            not_live_after = None
            while time.monotonic() - frozen < cfg.leases.lease_s + 8:  # past the bound asserted below
                st = await status(socks["a"])
                if st["ready_for_cutover"]:
                    assert await assert_converged(source, target, NAMESPACES)
                    assert set(held_by(st).get(ids["a"], [])) == set(NAMESPACES), "ready while b holds units"
                reasons = " ".join(st["not_ready_reasons"])
                if not_live_after is None and ("not live" in reasons or "expired" in reasons
                                               or unit in held_by(st).get(ids["a"], [])):
                    not_live_after = time.monotonic() - frozen
                if not_live_after is not None and st["ready_for_cutover"]:
                    break  # a took b's units and applied the write made after the freeze: READY, and equal
                await asyncio.sleep(0.5)
            assert not_live_after is not None and not_live_after <= cfg.leases.lease_s + 5, not_live_after
            print(f"a saw b not live {not_live_after:.1f}s after SIGSTOP")
        finally:
            workers["b"].proc.send_signal(signal.SIGCONT)
    finally:
        for child in workers.values():
            child.proc.send_signal(signal.SIGCONT)
            assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
