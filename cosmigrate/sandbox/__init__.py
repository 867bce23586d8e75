"""Loopback emulators of Cosmos DB for MongoDB (source) and Amazon DocumentDB (target).

Test and demo infrastructure, not part of the migration path: no MongoDB
server with change streams can be installed on our machines, and none would
behave like Cosmos anyway. Both servers speak the MongoDB wire protocol so the
real PyMongo client is exercised end to end.

    async with Sandbox() as sb:
        source = AsyncMongoClient(sb.source_uri)
        target = AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)

The target serves TLS with a CA made at start, as DocumentDB serves TLS with
its CA bundle; `ca_file_for_uri(target_uri)` finds that CA from the URI alone.
"""

from __future__ import annotations

from types import TracebackType

from cosmigrate.sandbox.cosmos import CosmosSource, beginning_token, make_list_token, make_token
from cosmigrate.sandbox.documentdb import DocumentDBTarget
from cosmigrate.sandbox.faults import Faults, FaultSpecError, parse_spec
from cosmigrate.sandbox.tls import ca_file_for_uri

__all__ = [
    "CosmosSource",
    "DocumentDBTarget",
    "Faults",
    "FaultSpecError",
    "Sandbox",
    "beginning_token",
    "make_list_token",
    "ca_file_for_uri",
    "make_token",
    "parse_spec",
]


class Sandbox:
    """Both emulators on 127.0.0.1, started and stopped together.

    `source_version`: a Cosmos DB server version, 3.6 to 7.0 (default 6.0);
    `target_version`: a DocumentDB version, 3.6, 4.0, 5.0 (default), 8.0, or "elastic".
    """

    def __init__(
        self,
        *,
        source_faults: Faults | None = None,
        target_faults: Faults | None = None,
        source_port: int = 0,
        target_port: int = 0,
        host: str = "127.0.0.1",
        target_version: str = "5.0.0",
        source_version: str = "6.0",
        target_tls: bool = True,
    ) -> None:
        self.source = CosmosSource(source_faults, host=host, version=source_version)
        self.target = DocumentDBTarget(target_faults, host=host, version=target_version, tls=target_tls)
        self._ports = (source_port, target_port)

    @property
    def source_uri(self) -> str:
        return self.source.uri()

    @property
    def target_uri(self) -> str:
        return self.target.uri()

    @property
    def target_ca_file(self) -> str:
        """The target's CA certificate (`target.tls_ca_file`, PyMongo's `tlsCAFile`); "" with target_tls=False."""
        return self.target.ca_file

    async def start(self) -> Sandbox:
        await self.source.start(self._ports[0])
        await self.target.start(self._ports[1])
        return self

    async def stop(self) -> None:
        await self.source.stop()
        await self.target.stop()

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
