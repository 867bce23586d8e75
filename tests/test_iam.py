"""The instance role allows exactly the AWS calls cosmigrate makes, on exactly the resources it touches.

Every S3 and DynamoDB request of `ledger init` (on the stack's existing table), `preflight`, and a daemon
that captures, applies and tags batches is recorded against moto with a botocore event hook, mapped to
its IAM action and resource, and compared with the role's policies in core-resources.yaml: no action
the code needs may be missing, none the code does not use may be granted, and every request must fall
inside a statement's resources and its `dynamodb:LeadingKeys` condition.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from pymongo import AsyncMongoClient

from cosmigrate.aws import LazyClient
from cosmigrate.ledgerinit import init_ledger_and_store
from cosmigrate.preflight import Preflight
from cosmigrate.sandbox import Sandbox
from cosmigrate.stores import APPLIED_TAG_KEY, APPLIED_TAG_VALUE
from tests.helpers import make_config, prepare_backends, wait_for
from tests.test_apply import Running

TEMPLATE = Path(__file__).parent.parent / "deploy" / "cloudformation" / "core-resources.yaml"
ACCOUNT, REGION = "123456789012", "us-east-1"
# Which role policies are the daemon's (the others serve the install, Session Manager and the CloudWatch agent).
DAEMON_POLICIES = ("cosmigrate-batches", "cosmigrate-ledger")
S3_ACTIONS = {"PutObject": "s3:PutObject", "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
              "DeleteObject": "s3:DeleteObject", "PutObjectTagging": "s3:PutObjectTagging",
              "HeadBucket": "s3:ListBucket", "ListObjectsV2": "s3:ListBucket"}
TRANSACT_ACTIONS = {"Put": "dynamodb:PutItem", "Update": "dynamodb:UpdateItem", "Delete": "dynamodb:DeleteItem",
                    "ConditionCheck": "dynamodb:ConditionCheckItem"}


class Recorder:
    """Records (service, operation, params) of every request made through cosmigrate's AWS clients."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.on = False

    def __call__(self, event_name: str, params: dict[str, Any], **_: Any) -> None:
        if self.on:
            _, service, operation = event_name.split(".")
            self.calls.append((service, operation, params))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    original = LazyClient.get

    async def get(self: LazyClient) -> Any:
        fresh = self._client is None
        client = await original(self)
        if fresh:
            client.meta.events.register("provide-client-params.*.*", rec)
        return client

    monkeypatch.setattr(LazyClient, "get", get)
    return rec


def _sub(value: Any, names: dict[str, str]) -> Any:
    """Resolve the intrinsic functions the role uses (Sub, Ref, GetAtt) with this test's names."""
    if isinstance(value, list):
        return [_sub(v, names) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (fn, arg), = value.items()
        if fn == "Fn::Sub":
            text = arg
            for name, resolved in names.items():
                text = text.replace("${" + name + "}", resolved)
            assert "${" not in text, text
            return text
        if fn == "Ref":
            return names[arg]
        if fn == "Fn::GetAtt":
            return names[".".join(arg)]
    if isinstance(value, dict):
        return {k: _sub(v, names) for k, v in value.items()}
    return value


def role_statements(names: dict[str, str]) -> list[dict[str, Any]]:
    template, problems = decode(str(TEMPLATE))
    assert not problems
    policies = template["Resources"]["InstanceRole"]["Properties"]["Policies"]
    assert "ManagedPolicyArns" not in template["Resources"]["InstanceRole"]["Properties"]
    out = []
    for policy in policies:
        if isinstance(policy, dict) and policy.get("PolicyName") in DAEMON_POLICIES:
            for statement in policy["PolicyDocument"]["Statement"]:
                statement = _sub(statement, names)
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
                leading = statement.get("Condition", {}).get("ForAllValues:StringLike", {}).get("dynamodb:LeadingKeys")
                out.append({"sid": statement["Sid"], "actions": set(actions), "resources": resources, "leading": leading})
    return out


def requests(calls: list[tuple[str, str, dict[str, Any]]], table_arn: str) -> Iterator[tuple[str, str, list[str]]]:
    """(IAM action, resource ARN, DynamoDB leading keys) for each recorded call."""
    for service, operation, params in calls:
        if service == "s3":
            assert operation in S3_ACTIONS, f"s3 {operation}: map it to its IAM action here and grant it in the role"
            arn = f"arn:aws:s3:::{params['Bucket']}" + (f"/{params['Key']}" if "Key" in params else "")
            yield S3_ACTIONS[operation], arn, []
        elif service == "dynamodb":
            if operation == "TransactWriteItems":
                for item in params["TransactItems"]:
                    (kind, body), = item.items()
                    key = body.get("Key") or body.get("Item")
                    yield TRANSACT_ACTIONS[kind], table_arn, [key["pk"]["S"]]
                continue
            keys: list[str] = []
            if "Key" in params:
                keys = [params["Key"]["pk"]["S"]]
            elif "Item" in params:
                keys = [params["Item"]["pk"]["S"]]
            elif operation == "Query":
                keys = [params["ExpressionAttributeValues"][":pk"]["S"]]
            yield f"dynamodb:{operation}", table_arn, keys
        else:
            raise AssertionError(f"unexpected AWS service {service} ({operation})")


async def test_the_role_allows_exactly_the_calls_cosmigrate_makes(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient, moto_endpoint: str,
        recorder: Recorder) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint)
    bucket = cfg.store.url.removeprefix("s3://").split("/")[0]
    table = cfg.ledger.url.removeprefix("dynamodb://")
    cfg.store.url = f"s3://{bucket}/cosmigrate"  # the template's default BatchPrefix
    await prepare_backends(cfg)  # what the stack does: the bucket and the table exist before the instance runs
    await source.app.users.insert_many([{"_id": i, "name": f"u{i}"} for i in range(30)])

    recorder.on = True
    await init_ledger_and_store(cfg)  # `ledger init` on the instance, under the role
    checks = await Preflight(cfg).run()
    assert all(c.ok for c in checks if c.name in ("batch store", "ledger")), [c.line() for c in checks]
    async with Running(cfg) as run:
        await run.writer("start")

        async def tagged() -> bool:
            return any(op == "PutObjectTagging" for _, op, _ in recorder.calls)

        await wait_for(tagged, 60, what="an applied batch tagged for expiry")
        await source.app.users.update_one({"_id": 1}, {"$set": {"name": "changed"}})

        async def converged() -> bool:
            return (await target.app.users.find_one({"_id": 1}) or {}).get("name") == "changed"

        await wait_for(converged, 60, what="the update on the target")
    recorder.on = False

    table_arn = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}"
    names = {"ChangeBatchBucket.Arn": f"arn:aws:s3:::{bucket}", "LedgerTable.Arn": table_arn,
             "BatchPrefix": "cosmigrate", "ClusterName": cfg.cluster_name}
    statements = role_statements(names)
    made = list(requests(recorder.calls, table_arn))
    granted = set().union(*(s["actions"] for s in statements))
    used = {action for action, _, _ in made}
    assert used == granted, f"granted but never used: {sorted(granted - used)}; used but not granted: {sorted(used - granted)}"
    for action, arn, keys in made:
        allowed = [s for s in statements if action in s["actions"]
                   and any(fnmatch.fnmatchcase(arn, pattern) for pattern in s["resources"])
                   and (s["leading"] is None or all(any(fnmatch.fnmatchcase(k, p) for p in s["leading"]) for k in keys))]
        assert allowed, f"{action} on {arn} (leading keys {keys}) is not allowed by the role"
    # Deletes touch only probe objects; tags are the ones the lifecycle rule expires.
    deleted = [arn for action, arn, _ in made if action == "s3:DeleteObject"]
    assert deleted and all("/_preflight/" in arn for arn in deleted)
    tagging = [params["Tagging"]["TagSet"] for _, op, params in recorder.calls if op == "PutObjectTagging"]
    assert all(tags == [{"Key": APPLIED_TAG_KEY, "Value": APPLIED_TAG_VALUE}] for tags in tagging)
    # `ledger init` on the stack's table needs no table administration.
    assert not {"CreateTable", "UpdateTimeToLive", "UpdateContinuousBackups", "CreateBucket"} & {op for _, op, _ in recorder.calls}


def test_the_bucket_is_versioned_and_expires_only_applied_batches() -> None:
    template, _ = decode(str(TEMPLATE))
    bucket = template["Resources"]["ChangeBatchBucket"]["Properties"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    rules = bucket["LifecycleConfiguration"]["Rules"]
    current = [r for r in rules if "ExpirationInDays" in r]
    assert len(current) == 1 and current[0]["TagFilters"] == [{"Key": APPLIED_TAG_KEY, "Value": APPLIED_TAG_VALUE}]
    assert all("Prefix" not in r and "ExpirationDate" not in r for r in rules)
    assert any("NoncurrentVersionExpiration" in r for r in rules)
