"""Waiting before a retry: capped exponential backoff, and Cosmos DB's own RetryAfterMs."""

from __future__ import annotations

import random
import re

from pymongo.errors import OperationFailure

_RETRY_AFTER = re.compile(r"RetryAfterMs=(\d+)")


class Backoff:
    """Capped exponential backoff with full jitter (the AWS architecture blog's recipe)."""

    def __init__(self, base: float = 0.1, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class IdlePace:
    """Pauses between polls of an idle change stream: none for its first two empty pages (a trickle stays as
    quick as ever), then a quarter second doubling up to `cap` (0: never pause), with a little jitter so that
    streams gone idle together do not poll together. `reset` on an event."""

    def __init__(self, cap: float, after: int = 2, first: float = 0.25) -> None:
        self.cap, self.after, self.first, self.idle = cap, after, first, 0

    def next_delay(self) -> float:
        self.idle += 1
        if self.cap <= 0 or self.idle <= self.after:
            return 0.0
        # The exponent stops growing at 60 (2**1024 is no float): a stream idle for hours must not raise.
        return min(self.cap, self.first * 2.0 ** min(self.idle - self.after - 1, 60)) * random.uniform(0.75, 1.0)

    def reset(self) -> None:
        self.idle = 0


def retry_after_s(exc: OperationFailure) -> float:
    """Cosmos says how long to wait (RetryAfterMs); add jitter so watchers do not stampede."""
    m = _RETRY_AFTER.search(str(exc))
    ms = int(m.group(1)) if m else 100
    return ms / 1000 * random.uniform(1.0, 1.5)
