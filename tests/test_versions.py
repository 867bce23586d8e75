"""Server versions: the sandbox reports each Cosmos DB and DocumentDB version as the real servers do, the
pinned PyMongo (through cosmigrate's clients) works with the supported ones, and the too-old ones are named in
one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from pymongo import AsyncMongoClient
from pymongo.common import MIN_SUPPORTED_WIRE_VERSION
from pymongo.errors import ConfigurationError, ServerSelectionTimeoutError

from cosmigrate import versions
from cosmigrate.mongo import SOURCE_MIN_WIRE, change_pipeline, source_client
from cosmigrate.sandbox import Sandbox, beginning_token, make_token
from cosmigrate.sandbox.cosmos import _token_text
from cosmigrate.versions import SOURCE, TARGET

SUPPORTED_SOURCES = ["4.2", "5.0", "6.0", "7.0"]
REFUSED_SOURCES = ["3.6", "4.0"]
SUPPORTED_TARGETS = ["5.0", "8.0", "elastic"]
REFUSED_TARGETS = ["3.6", "4.0"]


def test_the_pinned_driver_is_the_one_the_table_assumes() -> None:
    # pyproject pins the newest PyMongo, whose floor is wire 9 (MongoDB 4.4): the target keeps it, and the source
    # client accepts wire 8 (Cosmos DB 4.2) through cosmigrate.mongo's shim (tests/test_driver_shim.py).
    assert MIN_SUPPORTED_WIRE_VERSION == 9
    assert SOURCE_MIN_WIRE == 8
    assert versions.required_wire(SOURCE) == 8 and versions.required_wire(TARGET) == 9
    assert [v.name for v in versions.supported(SOURCE)] == SUPPORTED_SOURCES
    assert [v.name for v in versions.supported(TARGET)] == SUPPORTED_TARGETS
    assert versions.oldest_supported(SOURCE).name == "4.2" and versions.oldest_supported(TARGET).name == "5.0"


def test_check_answer() -> None:
    assert versions.check_answer(SOURCE, {"maxWireVersion": 8}, {"version": "4.2.0"}) is None
    assert versions.check_answer(SOURCE, {"maxWireVersion": 30}) is None  # a newer server than the table knows
    problem = versions.check_answer(SOURCE, {"maxWireVersion": 6}, {"version": "3.6.0"})
    assert problem is not None and problem.found == "3.6" and problem.oldest.name == "4.2"
    line = str(problem)
    assert "\n" not in line and "3.6" in line and "4.2" in line and "Azure portal" in line
    # Without buildInfo (refused before authentication) the wire version names the version.
    assert versions.check_answer(SOURCE, {"maxWireVersion": 7}).found == "4.0"  # type: ignore[union-attr]
    assert versions.check_answer(TARGET, {"maxWireVersion": 7}).found == "4.0"  # type: ignore[union-attr]
    assert "DocumentDB 4.0" in str(versions.check_answer(TARGET, {"maxWireVersion": 7}))
    assert versions.check_answer(SOURCE, {}) is not None  # no wire version at all: refused, not waved through


@pytest.mark.parametrize("version", SUPPORTED_SOURCES)
async def test_supported_cosmos_versions_through_the_real_client(version: str) -> None:
    expected = versions.COSMOS_VERSIONS[version]
    async with Sandbox(source_version=version) as sb:
        client: AsyncMongoClient = source_client(sb.source_uri, serverSelectionTimeoutMS=5000, document_class=dict)
        try:
            assert (await client.admin.command("buildInfo"))["version"] == expected.build_version
            assert (await client.admin.command("hello"))["maxWireVersion"] == expected.max_wire
            coll = client.app.users
            await coll.insert_many([{"_id": i} for i in range(3)])
            async with await coll.watch(change_pipeline(False), full_document="updateLookup",
                                        resume_after=beginning_token(), max_await_time_ms=100) as stream:
                first = [await asyncio.wait_for(stream.next(), 10) for _ in range(3)]
            assert [e["documentKey"]["_id"] for e in first] == [0, 1, 2]
            # Server versions from 4.0 on issue V2 tokens (every event of a page carries the page's end), and
            # resume from them.
            token = first[-1]["_id"]
            assert json.loads(_token_text(token))["V"] == 2
            await coll.insert_one({"_id": 99})
            async with await coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=token,
                                        max_await_time_ms=100) as stream:
                event = await asyncio.wait_for(stream.next(), 10)
            assert event["documentKey"]["_id"] == 99
        finally:
            await client.close()
        assert await versions.check_server(SOURCE, sb.source_uri) is None


@pytest.mark.parametrize("version", REFUSED_SOURCES)
async def test_refused_cosmos_versions_are_named_not_thrown(version: str) -> None:
    async with Sandbox(source_version=version) as sb:
        client: AsyncMongoClient = source_client(sb.source_uri, serverSelectionTimeoutMS=2000)
        try:
            with pytest.raises(ConfigurationError) as info:  # what the driver alone would say, shim or not
                await client.admin.command("ping")
        finally:
            await client.close()
        from_driver = versions.problem_from_driver_error(SOURCE, info.value)
        probed = await versions.check_server(SOURCE, sb.source_uri)
        assert probed is not None and from_driver is not None
        assert probed.found == from_driver.found == version
        assert probed.wire == versions.COSMOS_VERSIONS[version].max_wire
        with pytest.raises(versions.UnsupportedVersion, match=f"server version {version} "):
            await versions.require_supported(SOURCE, sb.source_uri)


async def _bare(sb: Sandbox, *commands: dict) -> list[dict]:
    return (await versions.command(sb.source.host, sb.source.port, [{"isMaster": 1}, *commands]))[1:]


async def test_cosmos_36_keeps_the_list_form_token() -> None:
    # 3.6 and 4.0 are refused by the source client, so their feeds are read over a bare socket.
    async with Sandbox(source_version="3.6") as sb, Sandbox(source_version="4.0") as newer:
        for box in (sb, newer):
            (inserted,) = await _bare(box, {"insert": "users", "documents": [{"_id": 1}, {"_id": 2}], "$db": "app"})
            assert inserted["ok"] == 1
        stage = {"$changeStream": {"fullDocument": "updateLookup", "resumeAfter": beginning_token()}}
        (reply,) = await _bare(sb, {"aggregate": "users", "pipeline": [stage, *change_pipeline(False)],
                                    "cursor": {}, "$db": "app"})
        events = reply["cursor"]["firstBatch"]
        assert [e["documentKey"]["_id"] for e in events] == [1, 2]
        data = json.loads(_token_text(events[-1]["_id"]))
        assert isinstance(data, list) and json.loads(data[0]["token"]) == "2"
        assert isinstance(json.loads(_token_text(reply["cursor"]["postBatchResumeToken"])), list)
        # A V2 token (never issued by a 3.6 account) is refused there, and accepted by 4.0.
        rid = newer.source.store.get("app", "users").feed.rid  # type: ignore[union-attr]
        v2 = {"$changeStream": {"fullDocument": "updateLookup", "resumeAfter": make_token(rid, 1)}}
        (old_reply,) = await _bare(sb, {"aggregate": "users", "pipeline": [v2, *change_pipeline(False)],
                                        "cursor": {}, "$db": "app"})
        (new_reply,) = await _bare(newer, {"aggregate": "users", "pipeline": [v2, *change_pipeline(False)],
                                           "cursor": {}, "$db": "app"})
        assert old_reply["ok"] == 0 and "token" in old_reply["errmsg"]
        assert new_reply["ok"] == 1 and [e["documentKey"]["_id"] for e in new_reply["cursor"]["firstBatch"]] == [2]


@pytest.mark.parametrize("version", SUPPORTED_TARGETS)
async def test_supported_documentdb_versions_through_the_real_client(version: str) -> None:
    expected = versions.DOCUMENTDB_VERSIONS[version]
    async with Sandbox(target_version=version) as sb:
        client: AsyncMongoClient = AsyncMongoClient(sb.target_uri, serverSelectionTimeoutMS=5000,
                                                    tlsCAFile=sb.target_ca_file)
        try:
            assert (await client.admin.command("buildInfo"))["version"] == expected.build_version
            hello = await client.admin.command("hello")
            assert hello["maxWireVersion"] == expected.max_wire
            await client.db.c.insert_one({"_id": 1})
            kind = client.topology_description.topology_type_name
            assert kind == ("Sharded" if version == "elastic" else "ReplicaSetWithPrimary"), kind
            assert ("setName" in hello) == (version != "elastic")
        finally:
            await client.close()
        assert await versions.check_server(TARGET, sb.target_uri, sb.target_ca_file) is None


@pytest.mark.parametrize("version", REFUSED_TARGETS)
async def test_refused_documentdb_versions_are_named(version: str) -> None:
    async with Sandbox(target_version=version) as sb:
        problem = await versions.check_server(TARGET, sb.target_uri, sb.target_ca_file)
        assert problem is not None and problem.found == version and problem.oldest.name == "5.0"
        assert "deploy/cloudformation/documentdb.yaml" in str(problem)


async def test_an_unreachable_server_is_left_to_the_driver() -> None:
    async with Sandbox() as sb:
        uri = sb.source_uri
    assert await versions.check_server(SOURCE, uri) is None  # stopped: nothing answers the probe
    client: AsyncMongoClient = AsyncMongoClient(uri, serverSelectionTimeoutMS=300)
    try:
        with pytest.raises(ServerSelectionTimeoutError) as info:
            await client.admin.command("ping")
    finally:
        await client.close()
    assert versions.problem_from_driver_error(SOURCE, info.value) is None


def test_unknown_versions_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="known: 3.6, 4.0, 4.2"):
        Sandbox(source_version="3.2")
    assert versions.lookup(TARGET, "8.0.0").max_wire == 25


async def test_sandbox_cli_source_version() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "sandbox", "--source-version", "4.2", "--target-version", "8.0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        source_uri = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        target_uri = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        ca_file = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        hello, build = await versions.probe(source_uri)
        assert (hello["maxWireVersion"], build and build["version"]) == (8, "4.2.0")
        hello, build = await versions.probe(target_uri, ca_file)
        assert (hello["maxWireVersion"], build and build["version"]) == (25, "8.0.0")
    finally:
        proc.terminate()
        await proc.wait()
    bad = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cosmigrate", "sandbox", "--source-version",
                                                   "3.2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--source-version" in bad.stderr


def test_cloudformation_offers_only_supported_documentdb_versions() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "deploy" / "cloudformation" / "documentdb.yaml").read_text()
    block = text.split("  EngineVersion:", 1)[1].split("\n  InstanceClass:", 1)[0]
    allowed = re.findall(r'"(\d+\.\d+\.\d+)"', block.split("AllowedValues:", 1)[1].splitlines()[0])
    offered = {versions.lookup(TARGET, v).name for v in allowed}
    assert offered == {v.name for v in versions.supported(TARGET) if not v.sharded}  # elastic: another resource type
    for v in allowed:
        assert f'"{v}": {{Name: docdb{v.rsplit(".", 1)[0]}}}' in text  # a parameter group family for each


async def test_the_daemon_reads_the_drivers_refusal_when_the_probe_cannot_run(tmp_path, monkeypatch) -> None:
    from cosmigrate.daemon import Daemon
    from tests.helpers import make_config, prepare_backends

    async def no_probe(*_args, **_kwargs):
        raise versions.ProbeError("no socket for the probe")

    monkeypatch.setattr(versions, "probe", no_probe)
    async with Sandbox(source_version="4.0") as sb:
        cfg = make_config(tmp_path, sb.source_uri, sb.target_uri, "file+sqlite")
        await prepare_backends(cfg)
        with pytest.raises(versions.UnsupportedVersion) as info:
            await asyncio.wait_for(Daemon(cfg).serve(), 60)
    assert info.value.problem.found == "4.0" and info.value.problem.role == SOURCE
    assert "Azure portal" in str(info.value)
