"""The Cosmos DB 4.2 shim (cosmigrate/mongo.py): the pinned, newest PyMongo refuses wire version 8, and only the
source client accepts it. These fail when a driver upgrade moves or renames what the shim touches, and when the
driver stops refusing wire 8 (the shim is then obsolete and should go)."""

from __future__ import annotations

import asyncio
import inspect

import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError
from pymongo.topology_description import TopologyDescription

from cosmigrate import mongo
from cosmigrate.mongo import SOURCE_MIN_WIRE, change_pipeline, source_client, target_client
from cosmigrate.sandbox import Sandbox, beginning_token


def test_the_driver_still_refuses_wire_8_where_the_shim_looks() -> None:
    assert pymongo.common.MIN_SUPPORTED_WIRE_VERSION > SOURCE_MIN_WIRE, \
        "the driver accepts wire 8 again: remove the shim in cosmigrate/mongo.py"
    wrapper = TopologyDescription._init_incompatible_err
    assert getattr(wrapper, "cosmigrate_shim", False), "the shim is not installed"
    # The driver's own check, which the shim wraps: still the one place that reads the floor and sets the error.
    checked = inspect.getsource(wrapper.__wrapped__)  # type: ignore[attr-defined]
    assert "common.MIN_SUPPORTED_WIRE_VERSION" in checked and "self._incompatible_err" in checked
    assert "max_wire_version" in checked and "is_server_type_known" in checked
    assert "self._init_incompatible_err()" in inspect.getsource(TopologyDescription.__init__)
    assert "common.MIN_SUPPORTED_WIRE_VERSION" not in inspect.getsource(TopologyDescription.check_compatible)
    # The mark: the client's `_monitor_class` option, kept when the settings are rebuilt after an SRV lookup.
    client_init = inspect.getsource(AsyncMongoClient.__init__)
    assert 'kwargs.pop("_monitor_class"' in client_init and '"monitor_class": monitor_class' in client_init
    rebuilt = inspect.getsource(AsyncMongoClient._init_based_on_options)
    assert 'monitor_class=self._resolve_srv_info["monitor_class"]' in rebuilt


async def test_the_source_client_carries_the_mark_into_its_topology() -> None:
    client = source_client("mongodb://127.0.0.1:9/?directConnection=true", serverSelectionTimeoutMS=100)
    try:
        assert client._topology_settings.monitor_class is mongo._SourceMonitor
        description = client.topology_description
        assert description._topology_settings.monitor_class.cosmigrate_min_wire == SOURCE_MIN_WIRE
    finally:
        await client.close()
    other = target_client("mongodb://127.0.0.1:9/?directConnection=true", serverSelectionTimeoutMS=100)
    try:
        assert not hasattr(other._topology_settings.monitor_class, "cosmigrate_min_wire")
    finally:
        await other.close()


async def test_only_the_source_client_accepts_cosmos_42() -> None:
    async with Sandbox(source_version="4.2") as sb:
        for name, client in (("plain", AsyncMongoClient(sb.source_uri, serverSelectionTimeoutMS=1000)),
                             ("target", target_client(sb.source_uri, serverSelectionTimeoutMS=1000))):
            try:
                try:
                    await client.admin.command("ping")
                except ConfigurationError as exc:
                    assert "reports wire version 8" in str(exc), (name, exc)
                else:
                    raise AssertionError(f"the {name} client accepted wire version 8")
            finally:
                await client.close()
        client = source_client(sb.source_uri, serverSelectionTimeoutMS=5000, document_class=dict)
        try:
            assert (await client.admin.command("hello"))["maxWireVersion"] == 8
            coll = client.app.users
            await coll.insert_many([{"_id": i} for i in range(3)])
            async with await coll.watch(change_pipeline(False), full_document="updateLookup",
                                        resume_after=beginning_token(), max_await_time_ms=100) as stream:
                async with asyncio.timeout(10):
                    seen = [(await stream.next())["documentKey"]["_id"] for _ in range(3)]
            assert seen == [0, 1, 2]
        finally:
            await client.close()
