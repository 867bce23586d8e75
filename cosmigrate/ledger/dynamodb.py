"""The DynamoDB ledger: one on-demand table keyed `pk` + `sk`.

Items (a simplification of DESIGN.md's layout, documented in the README):

| pk                  | sk               | what                                               |
| ------------------- | ---------------- | -------------------------------------------------- |
| `<cluster>`         | `control`        | writer switch                                      |
| `<cluster>`         | `ns#<ns>`        | namespace meta (owner, epoch, next_seq, token, ...) |
| `<cluster>#<ns>`    | `batch#<seq:012>`| one committed batch                                |

Keeping every namespace's meta under the cluster's partition makes status a
single Query. A capture commit is one TransactWriteItems: put the batch item
if absent + update the meta where `next_seq = seq AND epoch = mine`. When a
transaction's outcome is ambiguous (a lost response retried), the meta and
batch item are re-read to tell "already committed" from "fenced".
"""

from __future__ import annotations

import contextlib
import time
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

from cosmigrate.aws import LazyClient, error_code
from cosmigrate.aws import explain as _explain
from cosmigrate.ledger.base import BatchRecord, Fenced, LedgerError, NamespaceMeta, SeqConflict, WriterControl

APPLIED_BATCH_TTL_S = 7 * 24 * 3600


_code = error_code


class DynamoLedger:
    def __init__(self, url: str, table: str, cluster: str, *, region: str = "", endpoint_url: str = "") -> None:
        self.url = url
        self.table = table
        self.cluster = cluster
        self._client = LazyClient("dynamodb", region=region, endpoint_url=endpoint_url)
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

    async def _call(self, op: str, **kwargs: Any) -> Any:
        db = await self._db()
        try:
            return await getattr(db, op)(**kwargs)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                raise LedgerError(f"ledger table {self.table} does not exist; run `cosmigrate ledger init --config ...`") from None
            raise
        except BotoCoreError as exc:
            raise LedgerError(f"ledger table {self.table}: {_explain(exc)}") from exc

    # --- interface --------------------------------------------------------------------

    async def init(self) -> None:
        db = await self._db()
        try:
            await db.create_table(
                TableName=self.table,
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                BillingMode="PAY_PER_REQUEST",
                SSESpecification={"Enabled": True},
            )
        except ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise LedgerError(f"cannot create ledger table {self.table}: {_explain(exc)}") from exc
        waiter = db.get_waiter("table_exists")
        await waiter.wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        await self.check()
        with contextlib.suppress(ClientError):
            await db.update_continuous_backups(
                TableName=self.table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True})
        try:
            await db.update_time_to_live(TableName=self.table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})
        except ClientError as exc:
            if "already enabled" not in str(exc).lower() and _code(exc) != "ValidationException":
                raise LedgerError(f"cannot enable TTL on {self.table}: {_explain(exc)}") from exc

    async def check(self) -> None:
        try:
            desc = await self._call("describe_table", TableName=self.table)
        except ClientError as exc:
            raise LedgerError(f"ledger table {self.table}: {_explain(exc)}") from exc
        schema = {k["AttributeName"]: k["KeyType"] for k in desc["Table"]["KeySchema"]}
        if schema != {"pk": "HASH", "sk": "RANGE"}:
            raise LedgerError(f"ledger table {self.table} has key schema {schema}; expected pk (HASH) + sk (RANGE)")

    async def claim(self, ns: str, owner: str) -> NamespaceMeta:
        try:
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
        except ClientError as exc:
            raise LedgerError(f"cannot claim {ns}: {_explain(exc)}") from exc
        return self._to_meta(resp["Attributes"])

    async def _fenced_or(self, ns: str, epoch: int, exc: ClientError) -> None:
        meta = await self.get_namespace(ns)
        if meta is None or meta.epoch != epoch:
            raise Fenced(f"{ns}: taken over by another process (epoch {meta.epoch if meta else '?'} > mine {epoch})") from None
        raise LedgerError(f"{ns}: {_explain(exc)}") from exc

    async def set_start_token(self, ns: str, epoch: int, token: bytes) -> bool:
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET resume_token = :tok, updated_at = :now",
                ConditionExpression="epoch = :epoch AND attribute_not_exists(resume_token)",
                ExpressionAttributeValues=self._item({":tok": token, ":now": Decimal(str(time.time())), ":epoch": epoch}),
            )
            return True
        except ClientError as exc:
            if _code(exc) != "ConditionalCheckFailedException":
                raise LedgerError(f"{ns}: {_explain(exc)}") from exc
            meta = await self.get_namespace(ns)
            if meta is None or meta.epoch != epoch:
                raise Fenced(f"{ns}: taken over by another process") from None
            return False

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
        except ClientError as exc:
            if _code(exc) not in ("TransactionCanceledException", "ConditionalCheckFailedException"):
                raise LedgerError(f"{ns}: commit of seq {record.seq} failed: {_explain(exc)}") from exc
            meta = await self.get_namespace(ns)
            if meta is None or meta.epoch != epoch:
                raise Fenced(f"{ns}: taken over by another process (epoch {meta.epoch if meta else '?'} > mine {epoch})") from None
            if meta.next_seq == record.seq + 1:
                existing = await self._get_batch(ns, record.seq)
                if existing is not None and existing.checksum == record.checksum and meta.resume_token == resume_token:
                    return  # our own earlier attempt went through; its answer was lost
            raise SeqConflict(f"{ns}: committing seq {record.seq} but next_seq is {meta.next_seq}") from None

    async def _get_batch(self, ns: str, seq: int) -> BatchRecord | None:
        resp = await self._call("get_item", TableName=self.table, Key=self._batch_key(ns, seq), ConsistentRead=True)
        return self._to_batch(resp["Item"]) if "Item" in resp else None

    async def set_state(self, ns: str, epoch: int, state: str, error: str = "") -> None:
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET #state = :state, last_error = :err, updated_at = :now",
                ConditionExpression="epoch = :epoch",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues=self._item({":state": state, ":err": error, ":now": Decimal(str(time.time())), ":epoch": epoch}),
            )
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                await self._fenced_or(ns, epoch, exc)
            raise LedgerError(f"{ns}: {_explain(exc)}") from exc

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
        # Placeholder until the ledger's epoch check lands (another branch): `epoch` is accepted and ignored.
        try:
            await self._call(
                "update_item", TableName=self.table, Key=self._meta_key(ns),
                UpdateExpression="SET applied_seq = :new, updated_at = :now ADD applied_events :n",
                ConditionExpression="applied_seq = :old",
                ExpressionAttributeValues=self._item({":new": new_applied_seq, ":old": old_applied_seq, ":n": events,
                                                      ":now": Decimal(str(applied_at))}),
            )
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                raise SeqConflict(f"{ns}: applied_seq is no longer {old_applied_seq}") from None
            raise LedgerError(f"{ns}: {_explain(exc)}") from exc
        expires = Decimal(int(applied_at) + APPLIED_BATCH_TTL_S)
        for seq in range(old_applied_seq + 1, new_applied_seq + 1):
            with contextlib.suppress(ClientError, LedgerError):
                await self._call(
                    "update_item", TableName=self.table, Key=self._batch_key(ns, seq),
                    UpdateExpression="SET applied_at = :at, expires_at = :exp",
                    ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeValues=self._item({":at": Decimal(str(applied_at)), ":exp": expires}),
                )

    async def get_control(self) -> WriterControl:
        resp = await self._call("get_item", TableName=self.table, Key={"pk": {"S": self.cluster}, "sk": {"S": "control"}},
                                ConsistentRead=True)
        if "Item" not in resp:
            return WriterControl()
        d = self._plain(resp["Item"])
        return WriterControl(d.get("writer", "stopped"), d.get("changed_by", ""), float(d.get("changed_at", 0)))

    async def set_writer(self, writer: str, changed_by: str, changed_at: float) -> WriterControl:
        await self._call(
            "put_item", TableName=self.table,
            Item={"pk": {"S": self.cluster}, "sk": {"S": "control"},
                  **self._item({"writer": writer, "changed_by": changed_by, "changed_at": Decimal(str(changed_at))})},
        )
        return WriterControl(writer, changed_by, changed_at)

    async def close(self) -> None:
        await self._client.close()
