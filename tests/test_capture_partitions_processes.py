"""SIGKILL of real `cosmigrate run` processes during multi-partition capture, with partitions splitting."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.partitions import decode
from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    Workload,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
    write_config,
)
from tests.test_capture_processes import Child

NAMESPACES = ["app.users", "shop.items"]
# Quick by default; COSMIGRATE_CRASH_KILLS=100 for a soak.
KILLS = int(os.environ.get("COSMIGRATE_PARTITION_KILLS", "8"))


async def _check_all(cfg, source: AsyncMongoClient | None = None) -> bool:
    committed = await read_committed(cfg)
    expected = await source_docs(source, NAMESPACES) if source is not None else {}
    for ns in NAMESPACES:
        if source is not None:
            assert ns in committed, f"{ns} not captured"
        if ns in committed:
            # gap-free seqs, the stored position is the last batch's, per-document order, latest versions
            check_committed(committed[ns], expected.get(ns))
    return True


async def test_sigkill_during_partitioned_capture_with_splits_loses_nothing(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient
) -> None:
    sandbox.source.faults.partitions = 3
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=30,
                      max_batch_age_s=0.2)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    rng = random.Random(77)
    workload = Workload(source, NAMESPACES, keys_per_ns=400, seed=13)
    await workload.run_bulk(1500)  # history: replayed from every partition's beginning
    stop = asyncio.Event()
    writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.001))
    kills = splits = 0
    missed: list[str] = []  # why rounds got no split (in the message if none landed)
    try:
        # Until at least one split landed while a process read the partitions: a child whose crash point fires
        # before it commits gets no split that round (under load, several rounds in a row).
        while kills < KILLS or (splits == 0 and kills < 4 * KILLS):
            child = await Child.start(config, COSMIGRATE_CRASH_POINTS="after_put=0.02,after_commit=0.01")
            try:
                if (kills % 2 == 1 or kills >= KILLS) and splits < 4:  # a split while this process reads the partitions
                    ns = rng.choice(NAMESPACES)
                    db, _, coll = ns.partition(".")
                    committed_before = (await read_committed(cfg)).get(ns)
                    seqs = committed_before.next_seq if committed_before else 0

                    async def this_process_commits() -> bool:
                        if child.proc.returncode is not None:  # noqa: B023
                            return True  # one of its crash points fired first: no split this round
                        now = (await read_committed(cfg)).get(ns)  # noqa: B023
                        return now is not None and now.next_seq > seqs  # noqa: B023

                    t0 = time.monotonic()
                    await wait_for(this_process_commits, 30, what="the child to commit")
                    if child.proc.returncode is not None:
                        last = [line for line in child.stderr if "crash point" in line or "error" in line][-1:]
                        missed.append(f"{ns} from seq {seqs}: exited {child.proc.returncode} after "
                                      f"{time.monotonic() - t0:.1f}s {last}")
                    if child.proc.returncode is None:
                        await asyncio.sleep(rng.uniform(0.05, 0.3))
                        parts = sandbox.source.store.get(db, coll).feed.partitions  # type: ignore[union-attr]
                        sandbox.source.split_partition(db, coll, rng.randrange(len(parts)))
                        splits += 1
                await asyncio.wait_for(asyncio.shield(child.proc.wait()), rng.uniform(0.5, 1.5))
            except TimeoutError:
                pass
            code = await child.finish(signal.SIGKILL)
            assert code == -signal.SIGKILL, (code, child.stderr[-5:])
            kills += 1
            await _check_all(cfg)  # after every kill
    finally:
        stop.set()
        await writer
    assert splits >= 1, (f"no split landed in {kills} rounds: every child crashed before it committed: "
                         + "; ".join(missed[-6:])[:3000])
    final = await Child.start(config)
    try:
        await wait_for(lambda: _check_all(cfg, source), 120, what="every change captured after the kills")
        committed = await read_committed(cfg)

        async def units_follow_the_partitions() -> bool:
            # Every split is in the ledger once a batch of the namespace committed after it; a partition split
            # twice before capture saw the first is followed in one step (the grandchildren tile the parent).
            committed = await read_committed(cfg)
            for ns in NAMESPACES:
                db, _, coll = ns.partition(".")
                live = {p.range for p in sandbox.source.store.get(db, coll).feed.partitions}  # type: ignore[union-attr]
                units = decode(committed[ns].resume_token)
                assert {u.range for u in units if u.state == "tailing"} == live, ns
            return True

        for ns in NAMESPACES:  # one more batch in each namespace
            db, _, coll = ns.partition(".")
            await source[db][coll].insert_many([{"_id": f"after-{i}", "v": 0} for i in range(30)])
        await wait_for(lambda: _check_all(cfg, source), 60, what="the last writes captured")
        await wait_for(units_follow_the_partitions, 30, what="the ledger's units to follow the splits")
        committed = await read_committed(cfg)
        assert sum(u.state == "split" for ns in NAMESPACES for u in decode(committed[ns].resume_token)) >= 1
    finally:
        assert await final.finish(signal.SIGTERM) == 0, final.stderr[-5:]
    print(f"{kills} kills, {splits} splits, {workload.writes} writes")
