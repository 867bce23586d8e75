"""`within`: a time limit on one await, without `asyncio.wait_for`'s Python 3.11 flaw.

On 3.11, when a task is cancelled in the same loop turn as the awaitable it
waits on finishes, `asyncio.wait_for` returns the result and the cancellation
is lost (fixed in 3.12). A stop request that is lost that way left a delete
sweep looping after SIGTERM, and the daemon never exited. `asyncio.timeout`
has no such window: a cancellation always reaches the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """Await `aw` for at most `seconds` (None: no limit); raises TimeoutError when the time is up."""
    async with asyncio.timeout(seconds):
        return await aw


class Pulse:
    """Wakes every task waiting on it at that moment, and none that starts waiting later: an Event that is
    replaced as it fires (idle watchers and sweep loops end their pauses on it)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seconds: float) -> bool:
        """Wait until the next `fire` or `seconds`; True when fired."""
        try:
            await within(self._event.wait(), seconds)
        except TimeoutError:
            return False
        return True


def check_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop, even if a library swallowed the request.

    Retry loops call it before each new attempt: a cancellation lost inside one
    attempt (see the module docstring) then still ends the loop instead of
    leaving a task that nobody can stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], resend_s: float = 1.0) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again while any is still running.

    One `cancel()` is not always enough: PyMongo itself awaits `asyncio.wait_for`
    (connecting a socket), where Python 3.11 can drop the cancellation (see the
    module docstring), and the task then runs on. Sending it again at its next
    await ends it; a stop never waits on a task that lost its cancellation.
    """
    every = list(tasks)
    pending = {t for t in every if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=resend_s)
        for task in pending:
            task.cancel()
    for task in every:  # retrieved, as `gather(return_exceptions=True)` would: their outcome no longer matters
        if not task.cancelled():
            task.exception()


async def run_all(aws: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Run every awaitable to its end, at most `limit` at once, then raise the first failure (if any).

    Unlike a TaskGroup, one failure does not cancel the others: a unit taken while a sibling's ledger write
    failed must still start, not stay held and idle. If the caller is cancelled, every task is cancelled and
    awaited before the cancellation goes on (nothing keeps running behind the caller's back).
    """
    gate = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[T]) -> T:
        async with gate:
            return await aw

    tasks = [asyncio.ensure_future(one(aw)) for aw in aws]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        await cancel_and_wait(tasks)
        raise
    failures = [exc for exc in (task.exception() for task in tasks) if exc is not None]  # every one retrieved
    if failures:
        raise failures[0]
    return [task.result() for task in tasks]
