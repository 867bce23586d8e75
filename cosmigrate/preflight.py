"""`cosmigrate preflight`: catch a bad set-up before the migration starts.

Each check prints one line, `ok`, `FAIL` (with what to do, said once even when
several checks share it) or `SKIP (why)` when a check it depends on failed:
a check that could not run never says ok. A driver error is one line without
PyMongo's topology dump (`cosmigrate.drivererrors`), and the TLS line agrees
with what the connection met. The ledger check also notices a migration of
this cluster already running. Nothing is changed except a scratch collection on the target and a probe
object in the batch store, both removed again.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from cosmigrate.config import Config
from cosmigrate.drivererrors import advice, error_line, is_tls_failure
from cosmigrate.indexes import IndexReport, read_indexes, unsupported_index  # noqa: F401  (unsupported_index: tests)
from cosmigrate.ledger import LedgerError, open_ledger
from cosmigrate.ledgeradmin import holder
from cosmigrate.mongo import list_namespaces, open_change_stream, raw_collection, source_client, target_client
from cosmigrate.stores import StoreError, open_store, store_prefix
from cosmigrate.tls import connection_tls
from cosmigrate.versions import SOURCE, TARGET, check_server


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False
    """Not run: a check it depends on failed (`detail` says which); neither ok nor a failure of its own."""

    @property
    def failed(self) -> bool:
        return not self.ok and not self.skipped

    def line(self, advice: bool = True) -> str:
        if self.skipped:
            return f"SKIP  {self.name}: ({self.detail})"
        text = f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text + (f" -> {self.fix}" if self.fix and self.failed and advice else "")


def lines(checks: list[Check]) -> list[str]:
    """The report: one line per check, each piece of advice once (a later check with the same says "see above")."""
    out, given = [], set()
    for check in checks:
        repeated = check.failed and check.fix in given
        out.append(check.line(advice=not repeated) + (" -> (see above)" if repeated else ""))
        if check.failed and check.fix:
            given.add(check.fix)
    return out


class Preflight:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.checks: list[Check] = []
        self.namespaces: list[str] = []
        self.source: Any = None
        self.target: Any = None
        self.index_reports: list[IndexReport] | None = None
        self.target_error: BaseException | None = None

    async def _step(self, name: str, fn: Callable[[], Awaitable[Check]], fix: str) -> bool:
        try:
            check = await fn()
        except (PyMongoError, StoreError, LedgerError, OSError) as exc:
            role = name.split()[0]
            if name == "target reachable":
                self.target_error = exc
            check = Check(name, False, error_line(exc), advice(role, exc) if role in ("source", "target") else "")
        if not check.fix:
            check.fix = fix
        self.checks.append(check)
        return check.ok

    def _skip(self, why: str, *names: str) -> None:
        self.checks.extend(Check(name, False, why, skipped=True) for name in names)

    async def _clients(self) -> bool:
        """Build both clients. The config loader validates what the driver checks here; should the driver
        still refuse (another PyMongo version), that is a FAIL line, not a traceback."""
        for name, build in (("source", lambda: source_client(self.cfg.source.uri, serverSelectionTimeoutMS=10_000)),
                            ("target", lambda: target_client(self.cfg.target.uri, self.cfg.target.tls_ca_file,
                                                             serverSelectionTimeoutMS=10_000))):
            try:
                setattr(self, name, build())
            except (PyMongoError, ValueError, TypeError, OSError) as exc:
                self.checks.append(Check(f"{name} reachable", False,
                                         f"the driver refuses the {name} settings ({exc.__class__.__name__})",
                                         f"check {name}.uri" + (" and target.tls_ca_file" if name == "target" else "")))
                return False
        return True

    async def run(self) -> list[Check]:
        try:
            if not await self._clients():
                return self.checks
            source = await self._step("source reachable", self._source_reachable,
                                      "check source.uri (host, port 10255, user and password) and the network path "
                                      "to Azure")
            if not source:
                self._skip("source unreachable", "source namespaces", "source change stream")
            elif await self._step("source namespaces", self._source_namespaces,
                                  "check capture.include / capture.exclude, or the account is empty"):
                await self._step("source change stream", self._change_stream,
                                 "the account must support change streams (Cosmos DB for MongoDB, server 4.0+, "
                                 "RU-based); check the server version and that the user may read the collection")
            else:
                self._skip("no namespace to migrate", "source change stream")
            target = await self._step("target reachable", self._target_reachable,
                                      "check target.uri, the security group (port 27017 from this instance) and "
                                      "target.tls_ca_file (global-bundle.pem)")
            if target:
                await self._step("target write permission", self._target_write,
                                 "the target user needs readWrite on the migrated databases")
            else:
                self._skip("target unreachable", "target write permission")
            index_checks = ("target index compatibility", "unique indexes under DocumentDB semantics", "source TTL")
            if not (source and target and self.namespaces):
                self._skip("source unreachable" if not source else "target unreachable" if not target
                           else "no namespace to migrate", *index_checks)
            elif await self._step("target index compatibility", self._indexes,
                                  "cosmigrate does not build those indexes (status and the journal list them): "
                                  "create a supported equivalent on the target, or accept their absence "
                                  "(`cosmigrate indexes --plan`)") or self.index_reports:
                await self._step("unique indexes under DocumentDB semantics", self._unique,
                                 "Cosmos DB does not hold values inside arrays unique, DocumentDB does: change "
                                 "those documents at the source (or drop the index) before the migration; "
                                 "`cosmigrate indexes` lists them")
                await self._step("source TTL", self._ttl,
                                 "DocumentDB cannot expire by _ts: decide per namespace in the config's [ttl] "
                                 "table, \"db.coll\" = \"field:<date field>:<expireAfterSeconds>\" (a TTL "
                                 "index enabled at cutover) or \"db.coll\" = \"none\" (no expiry on the target)")
            else:
                self._skip("the source's indexes could not be read", *index_checks[1:])
            await self._step("target TLS", self._target_tls,
                             "use tls=true and target.tls_ca_file = /etc/cosmigrate/global-bundle.pem (the DocumentDB "
                             "CA bundle), without tlsInsecure / tlsAllowInvalidCertificates / tlsAllowInvalidHostnames")
            await self._step("target retryWrites=false", self._retry_writes,
                             "add retryWrites=false to target.uri: DocumentDB refuses retryable writes "
                             "(cosmigrate turns them off itself, but your applications need it)")
            await self._step("batch store", self._store,
                             "create the bucket (deploy/cloudformation/core-resources.yaml) or directory and "
                             "grant write access")
            if await self._step("ledger", self._ledger, "run `cosmigrate ledger init --config ...`"):
                await self._step("no migration running", self._no_migration,
                                 "this cluster_name is being migrated now: stop that daemon first, or check a new "
                                 "set-up under another cluster_name")
            else:
                self._skip("ledger unreachable", "no migration running")
            await self._step("control socket", self._socket,
                             "create the directory (systemd's RuntimeDirectory=cosmigrate does) or set control.socket")
        finally:
            for client in (self.source, self.target):
                if client is not None:
                    await client.close()
        return self.checks

    async def _source_reachable(self) -> Check:
        if problem := await check_server(SOURCE, self.cfg.source.uri):
            return Check("source server version", False, problem.detail, problem.todo)
        await self.source.admin.command("ping")
        info = await self.source.admin.command("buildInfo")
        await self.source.list_database_names()  # proves authentication
        return Check("source reachable", True, f"server version {info.get('version', '?')}, authenticated")

    async def _source_namespaces(self) -> Check:
        self.namespaces = await list_namespaces(self.source, self.cfg.capture.include, self.cfg.capture.exclude)
        if not self.namespaces:
            return Check("source namespaces", False, "no collection matches capture.include / capture.exclude")
        sizes = []
        for ns in self.namespaces[:20]:
            db, _, coll = ns.partition(".")
            sizes.append(f"{ns} ({await self.source[db][coll].estimated_document_count()} docs)")
        more = f" and {len(self.namespaces) - 20} more" if len(self.namespaces) > 20 else ""
        return Check("source namespaces", True, f"{len(self.namespaces)} to migrate: {', '.join(sizes)}{more}")

    async def _change_stream(self) -> Check:
        ns = self.namespaces[0]
        async with await open_change_stream(raw_collection(self.source, ns), None,
                                            deletes_preview=self.cfg.capture.deletes_preview, max_await_ms=100):
            pass
        return Check("source change stream", True, f"the Cosmos change-stream pipeline is accepted on {ns}")

    async def _target_reachable(self) -> Check:
        ca = self.cfg.target.tls_ca_file
        if ca and not await asyncio.to_thread(os.path.isfile, ca):
            return Check("target reachable", False, f"target.tls_ca_file {ca} does not exist")
        if problem := await check_server(TARGET, self.cfg.target.uri, ca):
            return Check("target server version", False, problem.detail, problem.todo)
        await self.target.admin.command("ping")
        info = await self.target.admin.command("buildInfo")
        tls = connection_tls(self.cfg.target.uri, ca)  # as the driver reads the options, never by substring
        how = "over TLS, certificate verified" if tls.secure else tls.problem
        return Check("target reachable", True, f"server version {info.get('version', '?')}, {how}")

    async def _target_tls(self) -> Check:
        tls = connection_tls(self.cfg.target.uri, self.cfg.target.tls_ca_file)
        if tls.secure and self.target_error is not None:  # the settings say verified; the connection did not agree
            if is_tls_failure(self.target_error):
                return Check("target TLS", False, f"the certificate was not verified: {error_line(self.target_error)}",
                             "set target.tls_ca_file to the DocumentDB CA bundle (/etc/cosmigrate/global-bundle.pem) "
                             "and use the cluster's endpoint name in target.uri")
            return Check("target TLS", False, "target unreachable: TLS not proven (configured on, with certificate "
                                              "verification)", skipped=True)
        if tls.secure:
            trust = self.cfg.target.tls_ca_file or str(self._uri_ca() or "the system's CA certificates")
            return Check("target TLS", True, f"on, certificate and host name verified against {trust}")
        return Check("target TLS", False, f"{tls.problem}; allowed only by target.allow_insecure_tls = true, "
                                          "so the password and the documents cross the network unprotected")

    def _uri_ca(self) -> str:
        from pymongo.uri_parser import split_options

        query = self.cfg.target.uri.partition("://")[2].partition("?")[2]
        try:
            return str(split_options(query, validate=False).get("tlsCAFile") or "") if query else ""
        except (ValueError, TypeError):
            return ""

    async def _target_write(self) -> Check:
        name = f"check_{uuid.uuid4().hex[:8]}"
        db = self.target["cosmigrate_preflight"]
        try:
            await db[name].insert_one({"_id": 1})
        finally:
            await db.drop_collection(name)
        return Check("target write permission", True, "wrote and removed a scratch collection")

    async def _indexes(self) -> Check:
        info = await self.target.admin.command("buildInfo")
        major = int(str(info.get("version", "5")).split(".")[0])
        self.index_reports = reports = await read_indexes(self.source, self.namespaces, major, self.cfg)
        problems = [f"{r.ns} {r.name} ({r.reason})" for r in reports if r.action == "cannot build" and not r.ttl]
        if problems:
            return Check("target index compatibility", False,
                         f"DocumentDB {major} cannot build {len(problems)} source indexes: {'; '.join(problems[:10])}")
        return Check("target index compatibility", True, f"every source index can be built on DocumentDB {major}")

    async def _unique(self) -> Check:
        checked = [r for r in self.index_reports or [] if r.unique is not None]
        bad = [r for r in checked if r.unique is not None and r.unique.groups]
        partial = [r for r in checked if r.unique is not None and not r.unique.complete]
        if bad:
            return Check("unique indexes under DocumentDB semantics", False, " | ".join(r.line() for r in bad[:5]))
        costs = "; ".join(f"{r.ns} {r.name}: {r.unique.cost(r.documents)}" for r in checked if r.unique is not None)
        if partial:
            return Check("unique indexes under DocumentDB semantics", False,
                         f"check stopped at its bound on {', '.join(r.ns + ' ' + r.name for r in partial)}: {costs}",
                         "run `cosmigrate indexes --max-candidates N` with a larger bound")
        detail = f"{len(checked)} checked, no source document breaks one" + (f" ({costs})" if costs else "")
        return Check("unique indexes under DocumentDB semantics", True, detail)

    async def _ttl(self) -> Check:
        ttl = [r for r in self.index_reports or [] if r.ttl]
        undecided = [r for r in ttl if r.ttl == "_ts" and not r.decided]
        if undecided:
            return Check("source TTL", False, "; ".join(f"{r.ns} {r.name}: {r.reason}" for r in undecided[:5]))
        if ttl:
            return Check("source TTL", True, "; ".join(
                f"{r.ns} {r.name}: " + (f"[ttl] decision {r.decision}" if r.decided else "enabled at cutover")
                for r in ttl[:5]) + "; the delete sweep removes expired documents until cutover")
        return Check("source TTL", True, "no collection expires documents at the source")

    async def _retry_writes(self) -> Check:
        ok = "retrywrites=false" in self.cfg.target.uri.lower()
        return Check("target retryWrites=false", ok, "set in target.uri" if ok else "target.uri lacks retryWrites=false")

    async def _store(self) -> Check:
        store = open_store(self.cfg)
        try:
            await store.check()
            prefix = store_prefix(self.cfg.store.url)
            key = f"{prefix + '/' if prefix else ''}{self.cfg.cluster_name}/_preflight/{uuid.uuid4().hex}"
            await store.put(key, b"preflight")
            if await store.get(key) != b"preflight":
                return Check("batch store", False, f"{self.cfg.store.url}: read back different bytes")
            await store.delete(key)
        finally:
            await store.close()
        return Check("batch store", True, f"{self.cfg.store.url}: write, read and delete work")

    async def _ledger(self) -> Check:
        ledger = open_ledger(self.cfg)
        try:
            await ledger.check()
        finally:
            await ledger.close()
        return Check("ledger", True, f"{self.cfg.ledger.url} is reachable with the right key schema")

    async def _no_migration(self) -> Check:
        ledger = open_ledger(self.cfg)
        try:
            held = await holder(self.cfg, ledger, None)
            recorded = len(await ledger.list_namespaces())
        finally:
            await ledger.close()
        if held:
            return Check("no migration running", False, f"cluster {self.cfg.cluster_name}: {held}")
        if recorded:
            return Check("no migration running", True, f"none now; {recorded} namespaces of cluster "
                         f"{self.cfg.cluster_name} are recorded from before: `run` resumes them "
                         "(`cosmigrate ledger drop-cluster` starts over)")
        return Check("no migration running", True, f"the ledger holds nothing of cluster {self.cfg.cluster_name} yet")

    async def _socket(self) -> Check:
        parent = Path(self.cfg.control.socket).parent
        probe = parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            return Check("control socket", False, f"{parent} is not writable by this user")
        return Check("control socket", True, f"{self.cfg.control.socket} can be created")
