"""A batch store in S3 (aioboto3), the production choice.

Every put carries a server-side encryption header. What still fails after
botocore's retries surfaces as StoreError and the caller retries with backoff
(a batch is never dropped).

Expiry: the bucket (deploy/cloudformation/core-resources.yaml) is versioned
and its lifecycle rule expires only objects tagged `cosmigrate-applied=true`,
which `mark_applied` sets once a batch is applied; noncurrent versions (an
overwritten or deleted object) expire after their own, longer, period, so a
lost unapplied batch can be restored from its previous version.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from cosmigrate.aws import LazyClient
from cosmigrate.aws import explain as _explain
from cosmigrate.stores.base import APPLIED_TAG_KEY, APPLIED_TAG_VALUE, ObjectMissing, StoreError


class S3Store:
    def __init__(self, url: str, bucket: str, prefix: str, *, region: str = "", endpoint_url: str = "",
                 sse: str = "AES256", kms_key_id: str = "") -> None:
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = LazyClient("s3", region=region, endpoint_url=endpoint_url)
        self._sse: dict[str, str] = {}
        if sse != "none":
            self._sse["ServerSideEncryption"] = sse
            if sse == "aws:kms" and kms_key_id:
                self._sse["SSEKMSKeyId"] = kms_key_id

    async def _s3(self) -> Any:
        return await self._client.get()

    async def put(self, key: str, data: bytes) -> None:
        s3 = await self._s3()
        try:
            await s3.put_object(Bucket=self.bucket, Key=key, Body=data, **self._sse)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"s3://{self.bucket}/{key}: put failed: {_explain(exc)}") from exc

    async def get(self, key: str) -> bytes:
        s3 = await self._s3()
        try:
            resp = await s3.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                return bytes(await body.read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(f"s3://{self.bucket}/{key}: no such batch object") from None
            raise StoreError(f"s3://{self.bucket}/{key}: get failed: {_explain(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"s3://{self.bucket}/{key}: get failed: {_explain(exc)}") from exc

    async def delete(self, key: str) -> None:
        s3 = await self._s3()
        try:
            await s3.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"s3://{self.bucket}/{key}: delete failed: {_explain(exc)}") from exc

    async def mark_applied(self, key: str) -> None:
        s3 = await self._s3()
        try:
            await s3.put_object_tagging(Bucket=self.bucket, Key=key,
                                        Tagging={"TagSet": [{"Key": APPLIED_TAG_KEY, "Value": APPLIED_TAG_VALUE}]})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(f"s3://{self.bucket}/{key}: no such batch object") from None
            raise StoreError(f"s3://{self.bucket}/{key}: tagging failed: {_explain(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"s3://{self.bucket}/{key}: tagging failed: {_explain(exc)}") from exc

    async def list(self, prefix: str) -> list[str]:
        s3 = await self._s3()
        keys: list[str] = []
        try:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"s3://{self.bucket}/{prefix}: list failed: {_explain(exc)}") from exc
        return sorted(keys)

    async def check(self) -> None:
        s3 = await self._s3()
        try:
            await s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(
                f"bucket {self.bucket}: not reachable ({_explain(exc)}); create it (deploy/cloudformation) "
                "and grant the instance role s3:PutObject/GetObject/PutObjectTagging/DeleteObject/ListBucket"
            ) from exc

    async def close(self) -> None:
        await self._client.close()
