"""Several `cosmigrate run` workers sharing one cluster (real processes, both ledgers): units spread and the
target converges; a SIGKILLed worker's units are taken; a worker frozen mid-write never lands an old version
over the new owner's (the target fence)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import bson
import pytest
from pymongo import AsyncMongoClient

from cosmigrate.config import worker_socket
from cosmigrate.partitions import decode
from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    Workload,
    assert_converged,
    backends,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
    write_config,
)
from tests.test_capture_processes import Child

# One unit per namespace (docs/design.md, "What a unit is"): the 6- and 1-partition collections of the issue,
# and two more so that three workers each hold some.
PARTITIONS = {"app.big": 6, "app.one": 1, "shop.a": 1, "shop.b": 1}
NAMESPACES = list(PARTITIONS)
KILLS = int(os.environ.get("COSMIGRATE_SCALE_KILLS", "1"))  # 50 for the long mode


async def status(sock: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--socket", sock, "status", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 2, 3), err.decode()
    return json.loads(out)


async def writer_start(sock: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--socket", sock, "writer", "start",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


def held_by(st: dict) -> dict[str, list[str]]:
    return {w["worker"]: w["units"] for w in st["workers"] if w["alive"]}


async def _setup(request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
                 partitions: dict[str, int]):
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None
    sandbox.source.faults.collection_partitions = ";".join(f"{ns}:{n}" for ns, n in partitions.items())
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, endpoint)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    for ns in partitions:
        db, _, coll = ns.partition(".")
        await source[db].create_collection(coll)
    return cfg, config


@pytest.mark.parametrize("backend", backends("s3+dynamodb"))
async def test_three_workers_share_the_units_and_survive_a_kill(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    cfg, config = await _setup(request, backend, tmp_path, sandbox, source, PARTITIONS)
    workload = Workload(source, NAMESPACES, keys_per_ns=300, seed=19)
    await workload.run_bulk(1000)
    names = ["w1", "w2", "w3"]
    socks = {n: worker_socket(cfg.control.socket, n) for n in names}
    workers = {n: await Child.start(config, COSMIGRATE_WORKER=n) for n in names}
    rng = random.Random(19)
    try:
        await wait_for(lambda: status(socks["w1"]), 60, what="w1's control socket")
        await writer_start(socks["w1"])

        async def spread() -> bool:
            held = held_by(await status(socks["w1"]))
            assert len(held) == 3 and all(held.values()), held
            assert sorted(u for units in held.values() for u in units) == sorted(NAMESPACES), held
            return True

        await wait_for(spread, 90, interval=1.0, what="every worker to hold some units")
        stop = asyncio.Event()
        writes = asyncio.create_task(workload.run(10**9, stop, pace_s=0.002))
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                st = await status(socks["w1"])
                victim = rng.choice([n for n in names if n != "w1"])
                vid = next(w["worker"] for w in st["workers"] if w["name"] == victim)
                lost = held_by(st).get(vid, [])
                await workers[victim].finish(signal.SIGKILL)
                killed = time.monotonic()

                async def taken(vid: str = vid, lost: list[str] = lost) -> bool:
                    held = held_by(await status(socks["w1"]))
                    owners = {u: w for w, units in held.items() for u in units}
                    assert all(owners.get(u, vid) != vid for u in lost), owners
                    assert set(owners) == set(NAMESPACES), owners
                    return True

                await wait_for(taken, 60, interval=0.5, what=f"{victim}'s units {lost} to be taken")
                print(f"{victim} killed: its units {lost} taken after {time.monotonic() - killed:.1f}s")
                workers[victim] = await Child.start(config, COSMIGRATE_WORKER=victim)
        finally:
            stop.set()
            await writes
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 120, interval=1.0, what="convergence")
    finally:
        for child in workers.values():
            assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
    moves = [e for child in workers.values() for e in child.events() if e.get("event", "").startswith("unit ")]
    assert moves, "no unit moved"
    assert [e for e in moves if "from" not in e or "to" not in e] == []


@pytest.mark.parametrize("backend", backends("s3+dynamodb"))
async def test_a_write_frozen_mid_flight_never_lands_over_the_new_owners(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    """Worker A is SIGSTOPped while the target holds its write of v2 (slow-write fault, longer than A's lease).
    B takes the unit and applies v3. Without the fence A's held write lands last and the target keeps v2
    while B says READY; with it, the target aborts the held write at its maxTimeMS and B writes only after
    A's lease plus that bound."""
    ns = "app.frozen"
    cfg, config = await _setup(request, backend, tmp_path, sandbox, source, {ns: 1})
    coll = source.app.frozen
    await coll.insert_one({"_id": "x", "v": 1})
    socks = {n: worker_socket(cfg.control.socket, n) for n in ("a", "b")}
    a = await Child.start(config, COSMIGRATE_WORKER="a")
    b: Child | None = None
    held_s = cfg.leases.lease_s * 2.5  # the target holds A's write this long: past B's takeover and first write
    try:
        await wait_for(lambda: status(socks["a"]), 60, what="a's control socket")
        await writer_start(socks["a"])
        tcoll = target.app.frozen

        async def applied(v: int) -> bool:
            doc = await tcoll.find_one({"_id": "x"})
            assert doc is not None and doc["v"] == v, doc
            return True

        await wait_for(lambda: applied(1), 60, what="v1 on the target")
        sandbox.target.faults.slow_write_ms = int(held_s * 1000)
        delayed = sandbox.target.writes_delayed
        await coll.replace_one({"_id": "x"}, {"_id": "x", "v": 2})
        await wait_for(lambda: asyncio.sleep(0, sandbox.target.writes_delayed > delayed), 30,
                       what="A's write of v2 held by the target")
        a.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        sandbox.target.faults.slow_write_ms = 0  # only the write already received stays held
        await coll.replace_one({"_id": "x"}, {"_id": "x", "v": 3})
        b = await Child.start(config, COSMIGRATE_WORKER="b")
        await wait_for(lambda: status(socks["b"]), 60, what="b's control socket")
        ready_seen = []
        while time.monotonic() - frozen < held_s + 5:  # until A's held write would have landed, and a bit
            st = await status(socks["b"])
            if st["ready_for_cutover"]:
                ready_seen.append(time.monotonic() - frozen)
                assert await applied(3), "B said READY while the target differs"
            await asyncio.sleep(0.5)
        a.proc.send_signal(signal.SIGCONT)
        await wait_for(lambda: applied(3), 30, what="the target to hold v3 after A resumed")
        await asyncio.sleep(3)  # A, resumed, must not write either (its lease is gone)
        assert await applied(3)
        assert await assert_converged(source, target, [ns])
        # B became READY (so the test saw readiness at all), but never before A's lease plus the bound.
        assert ready_seen, "B never became ready"
        assert min(ready_seen) >= cfg.leases.lease_s, ready_seen
    finally:
        a.proc.send_signal(signal.SIGCONT)
        assert await a.finish(signal.SIGTERM) == 0, a.stderr[-5:]
        if b is not None:
            assert await b.finish(signal.SIGTERM) == 0, b.stderr[-5:]
    lost = [e for e in a.events() if e.get("event") == "unit lost"]
    assert lost and lost[0]["unit"] == ns, [e.get("event") for e in a.events()][-20:]


async def test_run_workers_supervises_and_restarts_its_children(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    """`cosmigrate run --workers 2`: two children share the units, a killed child is started again and the units
    move back, SIGTERM stops both (each drains and hands over) and the supervisor exits 0."""
    partitions = {"app.p": 1, "app.q": 1}
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    for ns in partitions:
        await source.app.create_collection(ns.partition(".")[2])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "run", "--config", str(config), "--workers", "2",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        socks = [worker_socket(cfg.control.socket, n) for n in ("w1", "w2")]

        async def both_hold_one() -> dict:
            st = await status(socks[0])
            held = held_by(st)
            assert len(held) == 2 and all(len(u) == 1 for u in held.values()), held
            return st

        st = await wait_for(both_hold_one, 90, interval=1.0, what="two workers holding one unit each")
        w2 = next(w for w in st["workers"] if w["name"] == "w2")
        os.kill(w2["pid"], signal.SIGKILL)

        async def restarted() -> bool:
            now = await both_hold_one()
            alive = [w for w in now["workers"] if w["name"] == "w2" and w["alive"]]
            assert [w["pid"] for w in alive if w["pid"] != w2["pid"]] and all(w["units"] for w in alive
                                                                            if w["pid"] != w2["pid"]), alive
            return True

        await wait_for(restarted, 90, interval=1.0, what="w2 started again and holding a unit")
        await source.app.p.insert_one({"_id": 1})
        await writer_start(socks[0])
        await wait_for(lambda: assert_converged(source, target, list(partitions)), 60, what="convergence")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 90) == 0


@pytest.mark.parametrize("backend", backends("file+sqlite"))
async def test_a_rolling_restart_leaves_no_unit_ownerless_longer_than_a_renew_interval(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    from cosmigrate.leases import LeaseTable
    from cosmigrate.leases.records import WorkerId
    from cosmigrate.ledger import open_ledger

    cfg, config = await _setup(request, backend, tmp_path, sandbox, source, PARTITIONS)
    workload = Workload(source, NAMESPACES, keys_per_ns=200, seed=23)
    names = ["w1", "w2", "w3"]
    socks = {n: worker_socket(cfg.control.socket, n) for n in names}
    workers = {n: await Child.start(config, COSMIGRATE_WORKER=n) for n in names}
    ledger = open_ledger(cfg)
    table = LeaseTable(ledger, WorkerId("test-observer"))
    free_since: dict[str, float] = {}
    longest: dict[str, float] = {}
    watching = asyncio.Event()

    async def watch() -> None:
        while not watching.is_set():
            now = time.monotonic()
            for rec in await table.leases():
                if rec.free:
                    free_since.setdefault(rec.unit, now)
                    longest[rec.unit] = max(longest.get(rec.unit, 0.0), now - free_since[rec.unit])
                else:
                    free_since.pop(rec.unit, None)
            await asyncio.sleep(0.1)

    async def spread() -> bool:
        held = held_by(await status(socks["w1" if workers["w1"].proc.returncode is None else "w2"]))
        assert len(held) == 3 and all(held.values()) and sum(map(len, held.values())) == len(NAMESPACES), held
        return True

    stop = asyncio.Event()
    writes: asyncio.Task | None = None
    watcher: asyncio.Task | None = None
    try:
        await wait_for(lambda: status(socks["w1"]), 60, what="w1's control socket")
        await writer_start(socks["w1"])
        await wait_for(spread, 90, interval=1.0, what="every worker to hold some units")
        watcher = asyncio.create_task(watch())
        writes = asyncio.create_task(workload.run(10**9, stop, pace_s=0.002))
        for name in names:
            assert await workers[name].finish(signal.SIGTERM) == 0, workers[name].stderr[-5:]
            workers[name] = await Child.start(config, COSMIGRATE_WORKER=name)
            await wait_for(spread, 90, interval=1.0, what=f"{name} back with some units")
    finally:
        stop.set()
        if writes is not None:
            await writes
        watching.set()
        if watcher is not None:
            await watcher
    try:
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 120, interval=1.0, what="convergence")
    finally:
        for child in workers.values():
            assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
        await ledger.close()
    # Handed over at each SIGTERM, taken at the others' next read of the leases (every renew interval); the
    # 0.1 s poll of this observer and one conditional write are the slack.
    assert longest, "no handover was observed"
    assert max(longest.values()) <= cfg.leases.renew_s + 1.0, longest


@pytest.mark.parametrize("backend", backends("file+sqlite"))
async def test_a_split_during_a_takeover_loses_nothing_and_applies_nothing_out_of_order(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    """Worker A holds a 3-partition namespace and is SIGKILLed under a steady write load. A partition splits
    while the unit has no owner, another while B waits out A's lease and the bound, and a third once B tails.
    B resumes from A's committed per-partition positions: the children start from their parent's, so the
    target converges byte for byte, the committed batches keep every document's changes in order, and every
    write B sends (all target writes from A's last possible one on) carries a version no older than the one B
    wrote before it for that document: nothing is applied twice out of order."""
    ns = "app.split"
    db, _, name = ns.partition(".")
    cfg, config = await _setup(request, backend, tmp_path, sandbox, source, {ns: 3})
    workload = Workload(source, [ns], keys_per_ns=300, seed=29)
    await workload.run_bulk(600)
    socks = {n: worker_socket(cfg.control.socket, n) for n in ("a", "b")}
    written: list[tuple[float, bytes, int]] = []  # (when the target executed it, _id, v)
    store_doc = sandbox.target._store_doc

    def recording(coll, key, id_value, raw, doc, op):  # type: ignore[no-untyped-def]
        if coll.ns == ns:
            written.append((time.monotonic(), bson.encode({"_id": id_value}), bson.decode(raw).get("v", -1)))
        return store_doc(coll, key, id_value, raw, doc, op)

    sandbox.target._store_doc = recording  # type: ignore[method-assign]

    def split(index: int) -> None:
        parts = sandbox.source.store.get(db, name).feed.partitions  # type: ignore[union-attr]
        sandbox.source.split_partition(db, name, index % len(parts))

    async def owner() -> str:
        st = await status(socks["b"])
        held = held_by(st)
        names = {w["worker"]: w["name"] for w in st["workers"]}
        return next((names[w] for w, units in held.items() if ns in units), "")

    a = await Child.start(config, COSMIGRATE_WORKER="a")
    b: Child | None = None
    stop = asyncio.Event()
    writes: asyncio.Task | None = None
    try:
        await wait_for(lambda: status(socks["a"]), 60, what="a's control socket")
        await writer_start(socks["a"])
        await wait_for(lambda: assert_converged(source, target, [ns]), 90, interval=1.0, what="A's first copy")
        b = await Child.start(config, COSMIGRATE_WORKER="b")  # a standby: one unit, held by A
        await wait_for(lambda: status(socks["b"]), 60, what="b's control socket")
        assert await owner() == "a"
        writes = asyncio.create_task(workload.run(10**9, stop, pace_s=0.003))
        await wait_for(lambda: asyncio.sleep(0, len(written) > 50), 60, what="A applying live writes")
        await a.finish(signal.SIGKILL)
        killed = time.monotonic()
        split(0)  # no owner now: A is dead, B has not taken the lease yet

        async def b_holds() -> bool:
            assert await owner() == "b"
            return True

        await wait_for(b_holds, 90, interval=0.5, what="B to take A's unit")
        split(1)  # B holds the lease and waits out A's lease and the bound before its first write
        first = len(written)
        await wait_for(lambda: asyncio.sleep(0, len(written) > first), 90, what="B's first write")
        split(2)  # B tails
        await asyncio.sleep(1.0)
        stop.set()
        await writes
        writes = None
        await wait_for(lambda: assert_converged(source, target, [ns]), 120, interval=1.0, what="convergence")
    finally:
        stop.set()
        if writes is not None:
            await writes
        sandbox.target._store_doc = store_doc  # type: ignore[method-assign]
        if b is not None:
            assert await b.finish(signal.SIGTERM) == 0, b.stderr[-5:]
    committed = (await read_committed(cfg))[ns]
    check_committed(committed, (await source_docs(source, [ns]))[ns])
    assert sum(u.state == "split" for u in decode(committed.resume_token)) >= 3, decode(committed.resume_token)
    # A's writes were sent before its lease ran out and executed within the bound: everything after is B's.
    after = [(key, v) for t, key, v in written if t > killed + cfg.apply.write_bound_s]
    assert after, "B wrote nothing"
    last: dict[bytes, int] = {}
    for key, v in after:
        assert v >= last.get(key, -1), f"B wrote v{v} of {key!r} after v{last[key]}"
        last[key] = v
    print(f"{workload.writes} writes, {len(written)} target writes, {len(after)} by B")

