"""The AWS clients that the S3 store and the DynamoDB ledger share: one lazy aioboto3 client each.

botocore's "standard" retry mode handles throttling and 5xx answers; what
still fails reaches the caller, which retries with backoff (nothing is dropped).
"""

from __future__ import annotations

import contextlib
from typing import Any

import aioboto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError


def explain(exc: Exception) -> str:
    """A one-line description of a botocore error (code and message, no request ids)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return str(exc)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class LazyClient:
    """Opens the aioboto3 client for `service` on first use; `close()` releases it."""

    def __init__(self, service: str, *, region: str = "", endpoint_url: str = "") -> None:
        self._service = service
        self._session = aioboto3.Session()
        self._args: dict[str, Any] = {
            "config": BotoConfig(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=60),
        }
        if region:
            self._args["region_name"] = region
        if endpoint_url:
            self._args["endpoint_url"] = endpoint_url
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def get(self) -> Any:
        if self._client is None:
            self._stack = contextlib.AsyncExitStack()
            self._client = await self._stack.enter_async_context(self._session.client(self._service, **self._args))
        return self._client

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None
