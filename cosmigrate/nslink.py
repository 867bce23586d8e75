"""What deletes, verification and cutover need to know about one namespace's running pipeline.

They never reach into capture or apply themselves: the daemon hands them this
small view (the owner's epoch, how far capture and apply are, the latest
moment that is both captured and applied, a way to sample the head now), and
the applier's ordered path for writes (`cosmigrate.deletes.ordered`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cosmigrate.clock import Mono
from cosmigrate.tokens import Positions


def _never() -> float:
    return 0.0


def _mono_never() -> Mono:
    return Mono(0.0)


def _none() -> Positions | None:
    return None


async def _no_sample() -> None:
    return None


@dataclass
class NamespaceLink:
    ns: str
    epoch: int
    committed_seq: Callable[[], int] = lambda: -1
    written_seq: Callable[[], int] = lambda: -1
    caught_up_at: Callable[[], float] = _never
    """The latest sampled moment whose head is captured and applied (0: none yet)."""
    latest_head: Callable[[], Positions | None] = _none
    """The latest successfully sampled head, or None."""
    latest_head_at: Callable[[], Mono] = _mono_never
    """When that head was sampled (the monotonic clock before the request)."""
    caught_up_mono: Callable[[], Mono] = _mono_never
    """The monotonic moment of the latest sample that is captured and applied (Mono(0) before any): what a wait
    for "apply reached this head" compares with; `caught_up_at` is the same moment on the wall clock."""
    sample: Callable[[], Awaitable[None]] = field(default=_no_sample)
    """Sample the head now (so that caught_up_at can move past a moment just passed)."""
    add_head: Callable[[float, list[bytes]], None] = lambda at, tokens: None
    """Record a head sampled elsewhere (cutover's quiesced heads), so that catching up to it can be awaited."""
    deletes_applied: Callable[[], int] = lambda: 0
    """Deletes the applier sent from the feed (preview events, lookup misses gone at the source), counted before
    sending: a delete between the sweep's source and target counts would balance a stale document out."""

    async def wait_written(self, seq: int, limit_s: float) -> bool:
        """Wait until the applier has written every batch up to `seq` (bounded)."""
        deadline = time.monotonic() + limit_s
        while True:
            if self.written_seq() >= seq:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def wait_reached(self, moment: Mono, limit_s: float) -> bool:
        """Wait until a head sampled at or after `moment` is captured and applied (bounded; samples meanwhile).

        Heads only move forward, so that head covers every source write before `moment`. Before the first
        catch-up `caught_up_mono` is Mono(0): this waits, it never reads "nothing yet" as "reached".
        """
        deadline = Mono.now() + limit_s
        sampled: Mono | None = None
        while self.caught_up_mono() < moment:
            now = Mono.now()
            if now >= deadline:
                return False
            if sampled is None or now - sampled > 0.5:
                sampled = now
                await self.sample()
            await asyncio.sleep(0.05)
        return True

    async def wait_caught_up(self, after: float, limit_s: float) -> bool:
        """Wait until everything written at the source before `after` is applied (head samples say so)."""
        deadline = time.monotonic() + limit_s
        sampled = 0.0
        while self.caught_up_at() < after:
            if time.monotonic() >= deadline:
                return False
            if time.time() - sampled > 0.5:
                sampled = time.time()
                await self.sample()
            await asyncio.sleep(0.05)
        return True
