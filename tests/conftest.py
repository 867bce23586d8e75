"""Shared fixtures: the sandbox servers and real PyMongo async clients on them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.sandbox import Faults, Sandbox


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    # Two physical partitions per source collection by default: every test reads a partitioned Cosmos (tests of
    # one partition set `sandbox.source.faults.partitions = 1` before creating their collections).
    sb = Sandbox(source_faults=Faults(seed=7, partitions=2), target_faults=Faults(seed=7))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def source(sandbox: Sandbox) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(sandbox.source_uri, serverSelectionTimeoutMS=5000)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def target(sandbox: Sandbox) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(sandbox.target_uri, tlsCAFile=sandbox.target_ca_file,
                                                serverSelectionTimeoutMS=5000)
    try:
        yield client
    finally:
        await client.close()


# --- AWS (moto server over HTTP) ------------------------------------------------------

import os  # noqa: E402

from tests.helpers import AWS_ENV  # noqa: E402

os.environ.update(AWS_ENV)


@pytest.fixture(scope="session")
def moto_endpoint():
    from tests.motoserver import MotoServer  # moto, with DynamoDB requests isolated as the real service does

    server = MotoServer().start()
    try:
        yield server.url
    finally:
        server.stop()
