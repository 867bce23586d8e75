"""The DynamoDB ledger: one on-demand table keyed `pk` + `sk`.

Items (see docs/design.md, "Data layout"):

| pk                  | sk               | what                                               |
| ------------------- | ---------------- | -------------------------------------------------- |
| `<cluster>`         | `control`        | writer switch, first-discovery time                |
| `<cluster>`         | `ns#<ns>`        | namespace meta (owner, epoch, next_seq, token, ...) |
| `<cluster>#<ns>`    | `batch#<seq:012>`| one committed batch                                |
| `<cluster>|progress#<ns>` | `<kind>#<key>` | sweep progress, verification results, cutover (`<ns>` ""); `|` never occurs in a cluster name, so these never mix with batches |

Keeping every namespace's meta under the cluster's partition makes status a
single Query. A capture commit is one TransactWriteItems: put the batch item
if absent + update the meta where `next_seq = seq AND epoch = mine`.

Failures: every request goes through `_call`, which turns each botocore error
into a LedgerError (table-driven below) and retries the transient ones
(throttling, 5xx, dropped connections, transaction conflicts) a few times with
backoff before raising LedgerUnavailable. Every write is conditional, so when
a retried write finds its condition failed, the item is re-read to tell our
own earlier success whose answer was lost ("already done") from a real
SeqConflict or Fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from decimal import Decimal
from typing import Any

import aiohttp
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from cosmigrate.aws import LazyClient, error_code
from cosmigrate.aws import explain as _explain
from cosmigrate.backoff import Backoff
from cosmigrate.ledger.base import (
    BatchRecord,
    Fenced,
    LedgerError,
    LedgerUnavailable,
    NamespaceMeta,
    Progress,
    ProgressConflict,
    SeqConflict,
    WriterControl,
)
from cosmigrate.redact import redact

APPLIED_BATCH_TTL_S = 7 * 24 * 3600

# The ledger retries transient failures itself (botocore's own retries are off for its
# client, see _LedgerClient): one policy, and a bound on how long a ledger call may take
# before the caller hears LedgerUnavailable and applies its own, longer backoff.
RETRY_TRIES = 6
RETRY_BUDGET_S = 10.0
RETRY_BASE_S = 0.1
RETRY_CAP_S = 4.0

# Error codes worth retrying (DynamoDB's, and botocore's generic throttling ones); any HTTP 5xx is too.
TRANSIENT_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "Throttling", "ThrottledException",
    "RequestLimitExceeded", "RequestThrottled", "TooManyRequestsException", "LimitExceededException",
    "InternalServerError", "ServiceUnavailable", "TransactionInProgressException", "RequestTimeout",
    "RequestTimeoutException",
})

# Errors an operator must fix, with what to do. `{table}` and `{action}` (the IAM action) are filled in.
OPERATOR_HINTS = {
    "ResourceNotFoundException": "ledger table {table} does not exist; run `cosmigrate ledger init --config ...`",
    "AccessDeniedException": "access denied: the ledger needs the IAM permission dynamodb:{action} on table {table}",
    "UnrecognizedClientException": "AWS rejected the credentials used for ledger table {table}; check the access key",
    "ExpiredTokenException": "the AWS session token for ledger table {table} expired; renew the credentials",
}

# IAM actions behind the API calls whose name does not say it.
IAM_ACTIONS = {"transact_write_items": "PutItem and dynamodb:UpdateItem"}

# Transaction cancellation reasons that no retry will cure (besides ConditionalCheckFailed, handled by the caller).
PERMANENT_CANCEL_REASONS = frozenset({"ValidationError", "ItemCollectionSizeLimitExceeded"})

_REASONS_IN_MESSAGE = re.compile(r"\[([A-Za-z, ]+)\]\s*$")

_code = error_code


PURGE_PARALLEL = 16  # DeleteItem requests in flight during `ledger reset` / `drop-cluster`

class _LedgerClient(LazyClient):
    """The shared lazy DynamoDB client with botocore's retries off: `DynamoLedger._call` retries instead.

    The shared client lets botocore make up to 9 attempts with pauses of up to 20 s
    (and none once its client-wide retry quota is spent); stacked under the
    ledger's own retries, one ledger call could take minutes instead of seconds.
    """

    def __init__(self, *, region: str, endpoint_url: str) -> None:
        super().__init__("dynamodb", region=region, endpoint_url=endpoint_url)
        self._args["config"] = self._args["config"].merge(BotoConfig(retries={"mode": "standard", "total_max_attempts": 1}))


class _ConditionFailed(LedgerError):
    """A write's condition (or a transaction item's) was false: the method re-reads to decide what it means.

    Internal: each method catches it and raises Fenced or SeqConflict, or returns (already done).
    """


def _cancellation_reasons(exc: ClientError) -> set[str]:
    """The reason codes of a TransactionCanceledException (structured, else parsed from its message)."""
    reasons = exc.response.get("CancellationReasons")
    if reasons:
        return {str(r.get("Code") or "None") for r in reasons}
    m = _REASONS_IN_MESSAGE.search(str(exc.response.get("Error", {}).get("Message", "")))
    return {r.strip() for r in m.group(1).split(",")} if m else set()


class DynamoLedger:
    def __init__(self, url: str, table: str, cluster: str, *, region: str = "", endpoint_url: str = "") -> None:
        self.url = url
        self.table = table
        self.cluster = cluster
        self._client = _LedgerClient(region=region, endpoint_url=endpoint_url)
        self._ser = TypeSerializer()
        self._de = TypeDeserializer()

    async def _db(self) -> Any:
        return await self._client.get()

    def _item(self, values: dict[str, Any]) -> dict[str, Any]:
        return {k: self._ser.serialize(v) for k, v in values.items() if v is not None}

    def _plain(self, item: dict[str, Any]) -> dict[str, Any]:
        out = {k: self._de.deserialize(v) for k, v in item.items()}
        return {k: (int(v) if isinstance(v, Decimal) and v == v.to_integral_value() else float(v) if isinstance(v, Decimal) else v)
                for k, v in out.items()}

    def _meta_key(self, ns: str) -> dict[str, Any]:
        return {"pk": {"S": self.cluster}, "sk": {"S": f"ns#{ns}"}}

    def _batch_key(self, ns: str, seq: int) -> dict[str, Any]:
        return {"pk": {"S": f"{self.cluster}#{ns}"}, "sk": {"S": f"batch#{seq:012d}"}}

    def _to_meta(self, item: dict[str, Any]) -> NamespaceMeta:
        d = self._plain(item)
        token = d.get("resume_token")
        return NamespaceMeta(
            ns=d["ns"], owner=d.get("owner", ""), epoch=d.get("epoch", 0), next_seq=d.get("next_seq", 0),
            resume_token=bytes(token) if token is not None else None, applied_seq=d.get("applied_seq", -1),
            captured_events=d.get("captured_events", 0), applied_events=d.get("applied_events", 0),
            state=d.get("state", "running"), last_error=d.get("last_error", ""), updated_at=float(d.get("updated_at", 0)),
        )

    def _to_batch(self, item: dict[str, Any]) -> BatchRecord:
        d = self._plain(item)
        return BatchRecord(
            ns=d["ns"], seq=d["seq"], key=d["key"], events=d["events"], bytes=d["bytes"], raw_bytes=d["raw_bytes"],
            checksum=d["checksum"], first_captured_at=float(d["first_captured_at"]), captured_at=float(d["captured_at"]),
            applied_at=float(d["applied_at"]) if "applied_at" in d else None, epoch=d.get("epoch", 0),
        )

    def _translate(self, op: str, exc: Exception) -> LedgerError:
        """The ledger's own error for a botocore/network failure: LedgerUnavailable when a retry may cure it."""
        what = redact(f"ledger table {self.table}: {op}: {_explain(exc)}")
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "ConditionalCheckFailedException":
                return _ConditionFailed(what)
            if code == "TransactionCanceledException":
                reasons = _cancellation_reasons(exc)
                if "ConditionalCheckFailed" in reasons:
                    return _ConditionFailed(what)
                if reasons & PERMANENT_CANCEL_REASONS:
                    return LedgerError(what)
                return LedgerUnavailable(what)  # TransactionConflict, throttling, None: try again
            if code in OPERATOR_HINTS:
                action = IAM_ACTIONS.get(op, "".join(w.title() for w in op.split("_")))
                hint = OPERATOR_HINTS[code].format(table=self.table, action=action)
                return LedgerError(redact(f"{hint} ({_explain(exc)})"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return LedgerUnavailable(what) if code in TRANSIENT_CODES or status >= 500 else LedgerError(what)
        if isinstance(exc, BotoCoreError) and not isinstance(exc, (HTTPClientError, BotoConnectionError)):
            return LedgerError(what)  # no credentials or region, a bad parameter: retrying will not help
        return LedgerUnavailable(what)  # connection refused/reset/closed, timeouts

    async def _call(self, op: str, *, tolerate: frozenset[str] = frozenset(), **kwargs: Any) -> Any:
        """One DynamoDB request; only LedgerError subclasses leave (None for a `tolerate`d error code).

        Transient failures are retried here with backoff (bounded tries and time).
        A write whose answer was lost may thus run twice: each caller's condition
        plus re-read makes that harmless.
        """
        backoff = Backoff(base=RETRY_BASE_S, cap=RETRY_CAP_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_BUDGET_S
        tries = 0
        while True:
            tries += 1
            try:
                db = await self._db()
                return await getattr(db, op)(**kwargs)
            except ClientError as exc:
                if _code(exc) in tolerate:
                    return None
                err = self._translate(op, exc)
                cause: Exception = exc
            except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
                err, cause = self._translate(op, exc), exc
            delay = backoff.next_delay()
            if not isinstance(err, LedgerUnavailable) or tries >= RETRY_TRIES or loop.time() + delay > deadline:
                raise err from cause
            await asyncio.sleep(delay)

    def _fenced(self, ns: str, epoch: int, meta: NamespaceMeta | None) -> Fenced:
        return Fenced(f"{ns}: taken over by another process (stored epoch {meta.epoch if meta else 'none'}, mine {epoch})")

    # --- interface --------------------------------------------------------------------

    async def init(self) -> list[str]:
        """Describe an existing table (DescribeTable only: the instance role's rights), else create it.

        Creating needs dynamodb:CreateTable, UpdateContinuousBackups and UpdateTimeToLive: an
        administrator's credentials, or moto in tests. The stack (core-resources.yaml) normally
        creates the table with the same settings.
        """
        found = await self._call("describe_table", tolerate=frozenset({"ResourceNotFoundException"}),
                                 TableName=self.table)
        if found is not None:
            await self.check()
            table = found["Table"]
            billing = (table.get("BillingModeSummary") or {}).get("BillingMode", "PROVISIONED")
            items = await self._query(KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
                                      ExpressionAttributeValues=self._item({":pk": self.cluster, ":prefix": "ns#"}))
            return [
                f"ledger table {self.table}: exists ({table.get('TableStatus', '?')}, "
                f"{'on-demand' if billing == 'PAY_PER_REQUEST' else 'provisioned'}, key pk+sk as expected, "
                f"{'encrypted with KMS' if (table.get('SSEDescription') or {}).get('Status') == 'ENABLED' else 'encrypted at rest'})",
                f"ledger table {self.table}: {len(items)} namespaces recorded for cluster {self.cluster}; nothing created",
            ]
        try:
            await self._create()
        except LedgerError as exc:
            if "AccessDenied" in str(exc) or "access denied" in str(exc):
                raise LedgerError(f"ledger table {self.table} does not exist, and these credentials may not create it: "
                                  "deploy deploy/cloudformation/core-resources.yaml (it creates the table), or run "
                                  "`ledger init` once with rights to dynamodb:CreateTable") from None
            raise
        return [f"ledger table {self.table}: created (on-demand, encrypted, point-in-time recovery, "
                "TTL on expires_at)"]

    async def _create(self) -> None:
        await self._call(
            "create_table", tolerate=frozenset({"ResourceInUseException"}),
            TableName=self.table,
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            BillingMode="PAY_PER_REQUEST",
            SSESpecification={"Enabled": True},
        )
        try:
            waiter = (await self._db()).get_waiter("table_exists")
            await waiter.wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise self._translate("describe_table", exc) from exc
        await self.check()
        with contextlib.suppress(LedgerError):  # point-in-time recovery is a bonus, not a requirement
            await self._call("update_continuous_backups", TableName=self.table,
                             PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
        await self._call("update_time_to_live", tolerate=frozenset({"ValidationException"}),  # already enabled
                         TableName=self.table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})

    async def check(self) -> None:
        desc = await self._call("describe_table", TableName=self.table)
        schema = {k["AttributeName"]: k["KeyType"] for k in desc["Table"]["KeySchema"]}
        if schema != {"pk": "HASH", "sk": "RANGE"}:
            raise LedgerError(f"ledger table {self.table} has key schema {schema}; expected pk (HASH) + sk (RANGE)")

    async def claim(self, ns: str, owner: str) -> NamespaceMeta:
        """Unconditional: if an answer is lost and the call retried, the epoch is bumped twice, which is harmless."""
        resp = await self._call(
            "update_item", TableName=self.table, Key=self._meta_key(ns),
            UpdateExpression=(
                "SET #owner = :me, #ns = :ns, epoch = if_not_exists(epoch, :zero) + :one, "
                "next_seq = if_not_exists(next_seq, :zero), applied_seq = if_not_exists(applied_seq, :minus), "
                "captured_events = if_not_exists(captured_events, :zero), "
                "applied_events = if_not_exists(applied_events, :zero), #state = :running, "
                "last_error = :empty, updated_at = :now"
            ),
            ExpressionAttributeNames={"#owner": "owner", "#ns": "ns", "#state": "state"},
            ExpressionAttributeValues=self._item({
                ":me": owner, ":ns": ns, ":zero": 0, ":one": 1, ":minus": -1, ":running": "running",
                ":empty": "", ":now": Decimal(str(time.time())),
            }),
            ReturnValues="ALL_NEW",
        )
        return self._to_meta(resp["Attributes"])

    async def set_start_token(self, ns: str, epoch: int, token: bytes) -> bool:
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET resume_token = :tok, updated_at = :now",
                ConditionExpression="epoch = :epoch AND attribute_not_exists(resume_token)",
                ExpressionAttributeValues=self._item({":tok": token, ":now": Decimal(str(time.time())), ":epoch": epoch}),
            )
            return True
        except _ConditionFailed:
            meta = await self.get_namespace(ns)
            if meta is None or meta.epoch != epoch:
                raise self._fenced(ns, epoch, meta) from None
            return meta.resume_token == token  # ours: an earlier attempt went through and its answer was lost

    async def commit_batch(self, ns: str, epoch: int, record: BatchRecord, resume_token: bytes) -> None:
        batch_item = {
            **self._batch_key(ns, record.seq),
            **self._item({
                "ns": ns, "seq": record.seq, "key": record.key, "events": record.events, "bytes": record.bytes,
                "raw_bytes": record.raw_bytes, "checksum": record.checksum,
                "first_captured_at": Decimal(str(record.first_captured_at)),
                "captured_at": Decimal(str(record.captured_at)), "epoch": epoch,
            }),
        }
        try:
            await self._call(
                "transact_write_items",
                # One token for all our retries: DynamoDB then answers a repeat of a transaction
                # that went through (within 10 minutes) with success instead of a cancellation.
                ClientRequestToken=uuid.uuid4().hex,
                TransactItems=[
                    {"Put": {"TableName": self.table, "Item": batch_item, "ConditionExpression": "attribute_not_exists(pk)"}},
                    {"Update": {
                        "TableName": self.table, "Key": self._meta_key(ns),
                        "UpdateExpression": "SET next_seq = :next, resume_token = :tok, updated_at = :now ADD captured_events :n",
                        "ConditionExpression": "epoch = :epoch AND next_seq = :seq",
                        "ExpressionAttributeValues": self._item({
                            ":next": record.seq + 1, ":tok": resume_token, ":now": Decimal(str(time.time())),
                            ":n": record.events, ":epoch": epoch, ":seq": record.seq,
                        }),
                    }},
                ],
            )
        except _ConditionFailed:
            meta = await self.get_namespace(ns)
            if meta is None or meta.epoch != epoch:
                raise self._fenced(ns, epoch, meta) from None
            if meta.next_seq > record.seq:
                existing = await self._get_batch(ns, record.seq)
                if existing is not None and (existing.checksum, existing.epoch) == (record.checksum, epoch):
                    return  # our own earlier attempt went through; its answer was lost
            raise SeqConflict(f"{ns}: committing seq {record.seq} but next_seq is {meta.next_seq}") from None

    async def _get_batch(self, ns: str, seq: int) -> BatchRecord | None:
        resp = await self._call("get_item", TableName=self.table, Key=self._batch_key(ns, seq), ConsistentRead=True)
        return self._to_batch(resp["Item"]) if "Item" in resp else None

    async def set_state(self, ns: str, epoch: int, state: str, error: str = "") -> None:
        """Idempotent under a lost answer: the retry's condition (my epoch) still holds."""
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET #state = :state, last_error = :err, updated_at = :now",
                ConditionExpression="epoch = :epoch",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=self._item({":state": state, ":err": error, ":now": Decimal(str(time.time())), ":epoch": epoch}),
            )
        except _ConditionFailed:
            raise self._fenced(ns, epoch, await self.get_namespace(ns)) from None

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        resp = await self._call("get_item", TableName=self.table, Key=self._meta_key(ns), ConsistentRead=True)
        return self._to_meta(resp["Item"]) if "Item" in resp else None

    async def _query(self, **kwargs: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        start: dict[str, Any] | None = None
        while True:
            args = dict(kwargs, TableName=self.table, ConsistentRead=True)
            if start:
                args["ExclusiveStartKey"] = start
            resp = await self._call("query", **args)
            items.extend(resp.get("Items", []))
            start = resp.get("LastEvaluatedKey")
            limit = kwargs.get("Limit")
            if not start or (limit and len(items) >= limit):
                return items

    async def list_namespaces(self) -> list[NamespaceMeta]:
        items = await self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
            ExpressionAttributeValues=self._item({":pk": self.cluster, ":prefix": "ns#"}),
        )
        return sorted((self._to_meta(i) for i in items), key=lambda m: m.ns)

    async def list_batches(self, ns: str, start_seq: int = 0, limit: int | None = None) -> list[BatchRecord]:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND sk >= :from",
            "ExpressionAttributeValues": self._item({":pk": f"{self.cluster}#{ns}", ":from": f"batch#{start_seq:012d}"}),
        }
        if limit is not None:
            kwargs["Limit"] = limit
        items = await self._query(**kwargs)
        out = [self._to_batch(i) for i in items]
        return out[:limit] if limit is not None else out

    async def mark_applied(self, ns: str, epoch: int, old_applied_seq: int, new_applied_seq: int, events: int,
                           applied_at: float) -> None:
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET applied_seq = :new, updated_at = :now ADD applied_events :n",
                ConditionExpression="epoch = :epoch AND applied_seq = :old",
                ExpressionAttributeValues=self._item({":new": new_applied_seq, ":old": old_applied_seq, ":n": events,
                                                      ":epoch": epoch, ":now": Decimal(str(applied_at))}),
            )
        except _ConditionFailed:
            meta = await self.get_namespace(ns)
            if meta is None or meta.epoch != epoch:
                raise self._fenced(ns, epoch, meta) from None
            if meta.applied_seq != new_applied_seq:
                raise SeqConflict(
                    f"{ns}: applied_seq is {meta.applied_seq}, neither {old_applied_seq} nor {new_applied_seq}") from None
            # Our earlier attempt went through (and counted the events); its answer was lost.
            # Its batch stamps below may not have been written: write them (again).
        expires = Decimal(int(applied_at) + APPLIED_BATCH_TTL_S)
        for seq in range(old_applied_seq + 1, new_applied_seq + 1):
            # Best effort: applied_at is for audit and expiry. Failing here would make the caller
            # retry a mark that already took effect.
            with contextlib.suppress(LedgerError):
                await self._call(
                    "update_item", TableName=self.table, Key=self._batch_key(ns, seq),
                    UpdateExpression="SET applied_at = :at, expires_at = :exp",
                    ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeValues=self._item({":at": Decimal(str(applied_at)), ":exp": expires}),
                )

    def _control_key(self) -> dict[str, Any]:
        return {"pk": {"S": self.cluster}, "sk": {"S": "control"}}

    async def _control(self) -> dict[str, Any]:
        resp = await self._call("get_item", TableName=self.table, Key=self._control_key(), ConsistentRead=True)
        return self._plain(resp["Item"]) if "Item" in resp else {}

    async def get_control(self) -> WriterControl:
        d = await self._control()
        return WriterControl(d.get("writer", "stopped"), d.get("changed_by", ""), float(d.get("changed_at", 0)))

    async def set_writer(self, writer: str, changed_by: str, changed_at: float) -> WriterControl:
        """An update, not a put: the control item also holds the first-discovery marker."""
        await self._call(
            "update_item", TableName=self.table, Key=self._control_key(),
            UpdateExpression="SET writer = :w, changed_by = :by, changed_at = :at",
            ExpressionAttributeValues=self._item({":w": writer, ":by": changed_by, ":at": Decimal(str(changed_at))}),
        )
        return WriterControl(writer, changed_by, changed_at)

    async def get_first_discovery(self) -> float:
        return float((await self._control()).get("first_discovery_at", 0.0))

    async def set_first_discovery(self, at: float) -> float:
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._control_key(),
                UpdateExpression="SET first_discovery_at = :at",
                ConditionExpression="attribute_not_exists(first_discovery_at)",
                ExpressionAttributeValues=self._item({":at": Decimal(str(at))}),
            )
            return at
        except _ConditionFailed:
            # Recorded already: by someone else, or by our own attempt whose answer was lost.
            return await self.get_first_discovery()

    # --- progress items -------------------------------------------------------------------

    def _progress_key(self, ns: str, kind: str, key: str) -> dict[str, Any]:
        return {"pk": {"S": f"{self.cluster}|progress#{ns}"}, "sk": {"S": f"{kind}#{key}"}}

    def _to_progress(self, item: dict[str, Any]) -> Progress:
        d = self._plain(item)
        return Progress(d["ns"], d["kind"], d["key"], bytes(d["data"]), int(d.get("version", 1)),
                        float(d.get("updated_at", 0)))

    async def get_progress(self, ns: str, kind: str, key: str) -> Progress | None:
        resp = await self._call("get_item", TableName=self.table, Key=self._progress_key(ns, kind, key),
                                ConsistentRead=True)
        return self._to_progress(resp["Item"]) if "Item" in resp else None

    async def list_progress(self, ns: str, kind: str, prefix: str = "", limit: int | None = None) -> list[Progress]:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": self._item({":pk": f"{self.cluster}|progress#{ns}", ":prefix": f"{kind}#{prefix}"}),
        }
        if limit is not None:
            kwargs["Limit"] = limit
        out = [self._to_progress(i) for i in await self._query(**kwargs)]
        return out[:limit] if limit is not None else out

    def _fence_items(self, ns: str, epoch: int | None) -> list[dict[str, Any]]:
        if epoch is None:
            if ns:
                raise LedgerError(f"{ns}: a namespace's progress is written by its owner (an epoch is required)")
            return []
        return [{"ConditionCheck": {
            "TableName": self.table, "Key": self._meta_key(ns), "ConditionExpression": "epoch = :epoch",
            "ExpressionAttributeValues": self._item({":epoch": epoch}),
        }}]

    async def _write_progress(self, op: dict[str, Any], fence: list[dict[str, Any]]) -> None:
        if fence:
            await self._call("transact_write_items", ClientRequestToken=uuid.uuid4().hex, TransactItems=[*fence, op])
        elif "Update" in op:
            await self._call("update_item", **op["Update"])
        else:
            await self._call("delete_item", **op["Delete"])

    async def put_progress(self, ns: str, kind: str, key: str, data: bytes, *, epoch: int | None,
                           expect_version: int | None = None) -> None:
        fence = self._fence_items(ns, epoch)
        update: dict[str, Any] = {
            "TableName": self.table, "Key": self._progress_key(ns, kind, key),
            # Every attribute aliased: DATA, KEY and others are DynamoDB reserved words.
            "UpdateExpression": "SET #ns = :ns, #kind = :kind, #key = :key, #data = :data, #at = :now "
                                "ADD #version :one",
            "ExpressionAttributeNames": {"#ns": "ns", "#kind": "kind", "#key": "key", "#data": "data",
                                         "#at": "updated_at", "#version": "version"},
        }
        values: dict[str, Any] = {":ns": ns, ":kind": kind, ":key": key, ":data": data, ":one": 1,
                                  ":now": Decimal(str(time.time()))}
        if expect_version is not None:
            if expect_version == 0:
                update["ConditionExpression"] = "attribute_not_exists(pk)"
            else:
                update["ConditionExpression"] = "#version = :expect"
                values[":expect"] = expect_version
        update["ExpressionAttributeValues"] = self._item(values)
        try:
            await self._write_progress({"Update": update}, fence)
        except _ConditionFailed:
            if epoch is not None:
                meta = await self.get_namespace(ns)
                if meta is None or meta.epoch != epoch:
                    raise self._fenced(ns, epoch, meta) from None
            stored = await self.get_progress(ns, kind, key)
            if expect_version is not None and stored is not None and stored.version == expect_version + 1 \
                    and stored.data == data:
                return  # our own earlier attempt went through; its answer was lost
            raise ProgressConflict(f"{ns or 'cluster'} {kind}/{key}: version {stored.version if stored else 0}, "
                                   f"expected {expect_version}") from None

    async def delete_progress(self, ns: str, kind: str, key: str, *, epoch: int | None) -> None:
        fence = self._fence_items(ns, epoch)
        try:
            await self._write_progress({"Delete": {"TableName": self.table, "Key": self._progress_key(ns, kind, key)}},
                                       fence)
        except _ConditionFailed:
            raise self._fenced(ns, epoch or 0, await self.get_namespace(ns)) from None

    async def _keys(self, pk: str, prefix: str = "") -> list[dict[str, Any]]:
        condition = "pk = :pk" + (" AND begins_with(sk, :prefix)" if prefix else "")
        values = {":pk": pk, **({":prefix": prefix} if prefix else {})}
        return await self._query(KeyConditionExpression=condition, ProjectionExpression="pk, sk",
                                 ExpressionAttributeValues=self._item(values))

    async def _delete_keys(self, keys: list[dict[str, Any]]) -> None:
        """DeleteItem for each key, PURGE_PARALLEL at a time (a TaskGroup: one failure cancels the rest)."""
        limit = asyncio.Semaphore(PURGE_PARALLEL)

        async def one(key: dict[str, Any]) -> None:
            async with limit:
                await self._call("delete_item", TableName=self.table, Key=key)

        async with asyncio.TaskGroup() as group:
            for key in keys:
                group.create_task(one(key))

    async def purge(self, ns: str | None, *, dry_run: bool = False) -> dict[str, int]:
        names = [ns] if ns is not None else [m.ns for m in await self.list_namespaces()] + [""]
        counts = {"batches": 0, "progress": 0, "namespaces": 0, **({"control": 0} if ns is None else {})}
        for name in names:
            batches = await self._keys(f"{self.cluster}#{name}") if name else []
            progress = await self._keys(f"{self.cluster}|progress#{name}")
            counts["batches"] += len(batches)
            counts["progress"] += len(progress)
            if not dry_run:
                await self._delete_keys(batches + progress)
        if ns is not None:
            metas = [self._meta_key(ns)] if await self.get_namespace(ns) is not None else []
        else:
            metas = await self._keys(self.cluster)  # every namespace meta and the control item, last
            counts["control"] = sum(1 for k in metas if k["sk"]["S"] == "control")
        counts["namespaces"] = len(metas) - counts.get("control", 0)
        if not dry_run:
            await self._delete_keys(metas)
        return counts

    async def close(self) -> None:
        await self._client.close()
