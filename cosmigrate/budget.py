"""A bounded share of the source for background reads (the delete sweep, continuous verification).

Cosmos bills every request in request units out of the collection's
provisioned throughput; the change streams must never starve. A budget of
share `s` is a duty cycle: after a request that took `d` seconds, the caller
waits `d * (1/s - 1)` before the next, so at most `s` of the wall time is
spent reading. Throttling (16500, with Cosmos's `RetryAfterMs`) and
server-side-retry timeouts (50) are waited out and retried, never surfaced;
dropped connections are retried with backoff a few times. The cutover runs
with share 1 (the applications are stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pymongo.errors import ConnectionFailure, OperationFailure

from cosmigrate.backoff import Backoff, retry_after_s
from cosmigrate.clock import Mono

T = TypeVar("T")
THROTTLED = 16500
EXCEEDED_TIME_LIMIT = 50
MAX_CONNECTION_RETRIES = 8


class SourceBudget:
    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self.requests = 0
        self.throttled = 0
        self.busy_s = 0.0

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one request under the budget; retries throttling and lost connections."""
        backoff = Backoff(base=0.2, cap=10.0)
        failures = 0
        while True:
            t0 = Mono.now()
            try:
                result = await fn()
            except OperationFailure as exc:
                if exc.code == THROTTLED:
                    self.throttled += 1
                    await asyncio.sleep(retry_after_s(exc))
                    continue
                if exc.code == EXCEEDED_TIME_LIMIT:
                    self.throttled += 1
                    await asyncio.sleep(backoff.next_delay())
                    continue
                raise
            except ConnectionFailure:
                failures += 1
                if failures > MAX_CONNECTION_RETRIES:
                    raise
                await asyncio.sleep(backoff.next_delay())
                continue
            spent = t0.elapsed()
            self.requests += 1
            self.busy_s += spent
            if self.share < 1.0:
                await asyncio.sleep(spent * (1.0 / self.share - 1.0))
            return result
