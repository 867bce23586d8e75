"""The head sampler: every few seconds, each namespace's source head position.

One `GetChangeStreamTokens` call per namespace per interval (a few request
units each; `capture.head_sample_interval_s` sets the pace). The local clock is
read BEFORE the request is sent, so a sample never claims a moment later
than the head it carries. A failed sample adds nothing: freshness then ages
on its own, which is the point (an unreachable source must make lag grow).

Refusals that will not go away by waiting (no permission, an account or
server version without the custom command) make the namespace's freshness
*unknown* with a reason that says what to grant; readiness stays blocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from pymongo.errors import OperationFailure

from cosmigrate.backoff import retry_after_s
from cosmigrate.clock import Mono, Wall
from cosmigrate.freshness import Freshness
from cosmigrate.logs import get_logger
from cosmigrate.mongo import change_stream_tokens
from cosmigrate.redact import redact
from cosmigrate.timeouts import within

THROTTLED_CODES = {16500, 50}  # TooManyRequests; ExceededTimeLimit when server-side retry is on
THROTTLE_RETRIES = 3
UNAUTHORIZED = {13, 18}
UNSUPPORTED = {59, 115, 9, 40324}
GRANT = (
    "grant the source account's key the right to run the custom command GetChangeStreamTokens "
    "(a read-write or read-only account key; Entra ID roles need the customAction permission)"
)
UNSUPPORTED_TEXT = (
    "the source does not support GetChangeStreamTokens (upgrade the account's server version to 4.2 or later "
    "in the Azure portal)"
)


def classify(exc: BaseException) -> str | None:
    """The 'unknown freshness' reason for a permanent refusal, or None for a transient failure."""
    if isinstance(exc, OperationFailure):
        msg = str(exc).lower()
        if exc.code in UNAUTHORIZED or "not authorized" in msg or "unauthorized" in msg:
            return f"cannot sample the source head: not authorized; {GRANT}"
        if exc.code in UNSUPPORTED or "customaction" in msg or "no such command" in msg:
            return f"cannot sample the source head: {UNSUPPORTED_TEXT}"
    return None


class HeadSampler:
    """Samples the head of every namespace in `targets()` every `interval_s` seconds."""

    def __init__(
        self, source: Any, targets: Callable[[], Mapping[str, Freshness]], interval_s: float, concurrency: int = 16,
        max_per_s: float = 250.0,
    ) -> None:
        self.source = source
        self._limit = asyncio.Semaphore(concurrency)
        self.targets = targets
        self.interval_s = interval_s
        self.max_per_s = max_per_s
        self.round_s = interval_s
        """How often each namespace is sampled by `run`: the interval, or longer with more namespaces than
        `max_per_s` allows in it. What "recent" means for the periodic status line follows it."""
        self.log = get_logger()

    async def head(self, ns: str) -> tuple[Wall, Mono, list[bytes]]:
        """One head of `ns` (a throttled request is retried a few times, RetryAfterMs, bounded to ~2 s), with the
        clocks read before the request that answered; raises the last failure."""
        async with self._limit:
            for attempt in range(THROTTLE_RETRIES + 1):
                # Before each send: a sample never claims a moment later than its head. Lag is measured on the
                # monotonic clock (a wall clock stepped back must never show lag 0); the wall time is shown.
                wall, at = Wall.now(), Mono.now()
                try:
                    return wall, at, await within(change_stream_tokens(self.source, ns), max(5.0, self.interval_s * 5))
                except OperationFailure as exc:
                    if exc.code not in THROTTLED_CODES or attempt >= THROTTLE_RETRIES:
                        raise
                    await asyncio.sleep(min(retry_after_s(exc), 0.5))
            raise AssertionError("unreachable: the last attempt returns or raises")

    async def sample(self, ns: str, fresh: Freshness) -> None:
        try:
            wall, at, tokens = await self.head(ns)
        except Exception as exc:  # every failure only means "no sample this round"; never kill the sampler
            self._failed(ns, fresh, exc)
            return
        fresh.add_sample(at, tokens, wall=wall)

    def _failed(self, ns: str, fresh: Freshness, exc: BaseException) -> None:
        reason = classify(exc)
        if isinstance(exc, OperationFailure) and exc.code in THROTTLED_CODES:
            fresh.last_sample_error = f"head sample throttled by the source (code {exc.code})"
        else:
            fresh.last_sample_error = redact(str(exc))[:300] or type(exc).__name__
        if reason is not None:
            if fresh.unknown_reason != reason:
                self.log.warning("source head cannot be sampled; freshness unknown", namespace=ns, reason=reason)
            fresh.unknown_reason = reason

    async def run(self) -> None:
        """Every namespace once per round, the samples spread over the round at most `max_per_s` a second: ten
        thousand namespaces every two seconds would be more requests than the worker (and the account's
        request units) can serve. `ctl status`, the sweeps and the cutover sample what they need themselves."""
        while True:
            began = Mono.now()
            targets = dict(self.targets())
            self.round_s = max(self.interval_s, len(targets) / self.max_per_s)
            if targets:
                gap_s = 1 / self.max_per_s
                async with asyncio.TaskGroup() as group:
                    for i, (ns, fresh) in enumerate(targets.items()):
                        ahead = i * gap_s - began.elapsed()
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                        group.create_task(self.sample(ns, fresh))
            await asyncio.sleep(max(0.0, self.round_s - began.elapsed()))
