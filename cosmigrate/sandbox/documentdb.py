"""The Amazon DocumentDB personality: the target's refusals and failovers.

Rules emulated (see the README, "The sandbox"): no retryable writes (a write carrying
`txnNumber` is refused), at most 100,000 writes per command, unique indexes
enforced, no 2d/hashed/wildcard indexes (nor text and partial indexes below
5.0, nor collations below 8.0), no capped collections, no DBPointer,
JavaScript, Symbol or Undefined values. Faults: failovers (connection resets
and "not primary" for N seconds) and slow writes. TLS by default, with a CA made at start
(`cosmigrate.sandbox.tls`): clients need `ca_file`, as DocumentDB clients need its CA bundle.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cosmigrate.sandbox.bsonvalues import find_unsupported_type
from cosmigrate.sandbox.query import QueryError
from cosmigrate.sandbox.server import CommandError, DropConnection, MongoServer
from cosmigrate.sandbox.tls import ServerTls
from cosmigrate.versions import TARGET, lookup


class DocumentDBTarget(MongoServer):
    """Emulated Amazon DocumentDB cluster: instance-based 3.6, 4.0, 5.0 (default) or 8.0, or an elastic
    cluster ("elastic": the 5.0 wire protocol, answering `hello` as a mongos does, no replica set).
    Versions, wire versions and sources: `cosmigrate.versions.DOCUMENTDB_VERSIONS`."""

    set_name = "rs0"
    reject_retryable_writes = True

    def __init__(self, *args: Any, version: str = "5.0.0", tls: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = lookup(TARGET, version)
        self.server_version = self.version.build_version
        self.major = int(self.server_version.split(".")[0])
        self.max_wire_version = self.version.max_wire
        self.tls = tls
        self._tls: ServerTls | None = None

    @property
    def ca_file(self) -> str:
        """The CA certificate clients must trust (`target.tls_ca_file`); "" without TLS or before start."""
        return str(self._tls.ca_file) if self._tls is not None and self._tls.ca_file is not None else ""

    def uri(self) -> str:
        # Like a DocumentDB connection string: TLS on, the CA bundle given separately (`ca_file`).
        if self.version.sharded:  # an elastic cluster's endpoint is a router: no replicaSet option
            base = f"mongodb://{self.address}/?retryWrites=false"
        else:
            base = super().uri()
        return base + ("&tls=true" if self.tls else "")

    def hello_reply(self, conn_id: int, legacy: bool) -> dict[str, Any]:
        reply = super().hello_reply(conn_id, legacy)
        if self.version.sharded:
            for key in ("setName", "setVersion", "hosts", "me", "primary", "secondary"):
                reply.pop(key, None)
            reply["msg"] = "isdbgrid"
        return reply

    async def start(self, port: int = 0, tls: Any = None) -> None:
        if not self.tls:
            await super().start(port)
            return
        self._tls = ServerTls(self.host)
        try:
            await super().start(port, tls=self._tls.context)
            self._tls.publish(self.host, self.port)
        except BaseException:
            self._tls.close()
            self._tls = None
            raise

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            if self._tls is not None:
                self._tls.close()
                self._tls = None

    def is_primary(self) -> bool:
        return not self.faults.failing_over

    async def before_command(self, name: str, body: dict[str, Any]) -> None:
        await super().before_command(name, body)
        if self.faults.failing_over:
            if self.faults.chance(0.5):
                raise DropConnection()
            raise CommandError(10107, "not primary", "NotWritablePrimary")

    def check_capped(self) -> None:
        raise CommandError(115, "Capped collections are not supported by Amazon DocumentDB", "CommandNotSupported")

    async def cmd_createindexes(  # type: ignore[override]  # dispatch awaits a coroutine handler
        self, req: Any, db: str, body: dict[str, Any], conn_id: int,
    ) -> dict[str, Any]:
        if self.faults.slow_index_ms:  # an index build on a large collection takes a while
            await asyncio.sleep(self.faults.slow_index_ms / 1000)
        return super().cmd_createindexes(req, db, body, conn_id)

    def validate_index(self, spec: dict[str, Any]) -> None:
        name = spec.get("name", "?")
        for field, kind in dict(spec.get("key", {})).items():
            if "$**" in field:
                raise CommandError(67, f"index {name}: wildcard indexes are not supported", "CannotCreateIndex")
            if kind in ("2d", "hashed", "geoHaystack"):
                raise CommandError(67, f"index {name}: {kind} indexes are not supported", "CannotCreateIndex")
            if kind == "text" and self.major < 5:
                raise CommandError(67, f"index {name}: text indexes need DocumentDB 5.0", "CannotCreateIndex")
        if "partialFilterExpression" in spec and self.major < 5:
            raise CommandError(67, f"index {name}: partial indexes need DocumentDB 5.0", "CannotCreateIndex")
        if "collation" in spec and self.major < 8:
            raise CommandError(67, f"index {name}: collations need DocumentDB 8.0", "CannotCreateIndex")

    def validate_document(self, raw: bytes) -> None:
        found = find_unsupported_type(raw)
        if found is not None:
            path, type_name = found
            raise QueryError(2, f"Unsupported BSON type {type_name} in field '{path}'", "BadValue")
