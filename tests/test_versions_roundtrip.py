"""Capture and apply on the pinned PyMongo (through cosmigrate's source client) against the oldest and the newest supported server versions:
an in-process daemon from a Cosmos DB 4.2 / 7.0 source to a DocumentDB 5.0 / 8.0 / elastic target."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.daemon import Daemon
from cosmigrate.mongo import source_client
from cosmigrate.sandbox import Faults, Sandbox
from tests.helpers import (
    Workload,
    assert_converged,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    wait_for,
)

NAMESPACES = ["app.users", "shop.items"]


async def _ready(daemon: Daemon) -> bool:
    return daemon.control is not None


@pytest.mark.parametrize(("source_version", "target_version"), [("4.2", "5.0"), ("7.0", "8.0"), ("7.0", "elastic")])
async def test_capture_and_apply_round_trip(tmp_path: Path, source_version: str, target_version: str) -> None:
    async with Sandbox(source_faults=Faults(seed=3), target_faults=Faults(seed=3), source_version=source_version,
                       target_version=target_version) as sb:
        # The workload writes through the source client too: the driver alone refuses a 4.2 account (wire 8).
        source: AsyncMongoClient = source_client(sb.source_uri, serverSelectionTimeoutMS=5000, document_class=dict)
        target: AsyncMongoClient = AsyncMongoClient(sb.target_uri, serverSelectionTimeoutMS=5000,
                                                    tlsCAFile=sb.target_ca_file)
        cfg = make_config(tmp_path, sb.source_uri, sb.target_uri, "file+sqlite", max_batch_events=40)
        await prepare_backends(cfg)
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.serve())
        try:
            workload = Workload(source, NAMESPACES, keys_per_ns=100, seed=5)
            await workload.run(400)  # history: start_at = "beginning" replays it
            await wait_for(lambda: _ready(daemon), 30, what="daemon up")
            reply = await daemon.handle_control({"cmd": "writer", "action": "start"})
            assert reply["ok"], reply
            await workload.run(400)
            await wait_for(lambda: assert_converged(source, target, NAMESPACES), 90, what="convergence")
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 60)
            await source.close()
            await target.close()
        committed = await read_committed(cfg)
        for ns in NAMESPACES:
            check_committed(committed[ns])
            token = committed[ns].resume_token
            assert token is not None
            # The token committed is in the form this server version issues (V2 JSON from 4.0 on).
            assert b'"V":2' in token
        assert sb.target.store.writes > 0
