"""What deletes, verification and cutover need to know about one namespace's running pipeline.

They never reach into capture or apply themselves: the daemon hands them this
small view (the owner's epoch, how far capture and apply are, the latest
moment that is both captured and applied, a way to sample the head now), and
the applier's ordered path for writes (`cosmigrate.deletes.ordered`).

Times are `Mono` (this process's monotonic clock: what freshness compares)
except where a field says otherwise. `written_seq` means something only once
the applier has read its position from the ledger (`positioned`): before that
it is -1, which is "not known yet", never "nothing written" (a cutover resumed
after a restart used to take it for the latter and re-check nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cosmigrate.clock import Mono
from cosmigrate.tokens import Positions


class ApplierNotReady(Exception):
    """The applier did not read its position from the ledger in time: its written_seq is not known."""


def _no_mono() -> Mono | None:
    return None


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
    positioned: Callable[[], bool] = lambda: True
    """Whether the applier has read its position from the ledger (until then written_seq() is -1: unknown)."""
    caught_up: Callable[[], Mono | None] = _no_mono
    """The latest sampled moment whose head is captured and applied (None: none yet)."""
    latest_head: Callable[[], Positions | None] = _none
    """The latest successfully sampled head, or None."""
    latest_head_at: Callable[[], Mono | None] = _no_mono
    """When that head was sampled, on the monotonic clock before the request (None: never). The delete sweep reads
    it with `latest_head`: a pass claims that head, and waits until `caught_up` reaches this moment."""
    sample: Callable[[], Awaitable[None]] = field(default=_no_sample)
    """Sample the head now (so that caught_up can move past a moment just passed)."""
    add_head: Callable[[Mono, list[bytes]], None] = lambda at, tokens: None
    """Record a head sampled elsewhere (cutover's quiesced heads), so that catching up to it can be awaited."""
    expires: Callable[[], bool] = lambda: False
    """The source deletes documents by time (a TTL index, or indexes not known): expiry moves no head, so a
    sweep pass is due on its interval alone, and only a recent pass reconciles (`cosmigrate.deletes.service`)."""
    deletes_applied: Callable[[], int] = lambda: 0
    """Deletes the applier sent from the feed (preview events, lookup misses gone at the source), counted before
    sending: a delete between the sweep's source and target counts would balance a stale document out."""
    reuse_heads_s: float = 0.5
    """How old the latest head (sampled by anyone: the worker's periodic sampler included) may be before a wait
    samples one itself, and how often it then does. The worker sets twice its sampler's interval: the delete
    sweeps and verification of a thousand namespaces, each waiting for catch-up, then reuse the sampler's heads
    instead of asking the source for one per namespace every half second (which starved the worker). The
    cutover asks for its own pace (`wait_caught_up_to(..., sample_every_s=0.5)`)."""

    async def wait_written(self, seq: int, limit_s: float) -> bool:
        """Wait until the applier has written every batch up to `seq` (bounded)."""
        deadline = Mono.now() + limit_s
        while True:
            if self.positioned() and self.written_seq() >= seq:
                return True
            if Mono.now() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def written_when_positioned(self, limit_s: float) -> int:
        """The applier's written_seq, once it is known (waits for the applier to read the ledger, bounded).

        Raises ApplierNotReady after `limit_s`: a caller must never take the -1 of an applier that is still
        starting (waiting for its unique indexes) for "nothing to do"."""
        deadline = Mono.now() + limit_s
        while not self.positioned():
            if Mono.now() >= deadline:
                raise ApplierNotReady(f"{self.ns}: the applier has not read its position from the ledger after "
                                      f"{limit_s:g}s (it starts once the target's unique indexes exist; see the "
                                      "namespace's indexes in status)")
            await asyncio.sleep(0.05)
        return self.written_seq()

    async def wait_caught_up_to(self, after: Mono, limit_s: float, sample_every_s: float | None = None) -> bool:
        """Wait until everything written at the source before `after` is applied (head samples say so).

        Heads only move forward: a sample taken at or after `after` that is captured and applied covers every
        source write before it. Before the first catch-up `caught_up` is None: this waits, it never reads
        "nothing yet" as "reached". A head sampled by the worker's periodic sampler counts like one of its own
        (`reuse_heads_s`, or `sample_every_s` when given).
        """
        every_s = self.reuse_heads_s if sample_every_s is None else sample_every_s
        return await self._sampling_until(lambda: (at := self.caught_up()) is not None and at >= after, limit_s,
                                          every_s)

    async def _sampling_until(self, done: Callable[[], bool], limit_s: float, every_s: float) -> bool:
        """Poll `done`, sampling the head itself only when no head younger than `every_s` exists and it did not
        sample within `every_s` (so that catch-up can move), bounded. Polls at a tenth of that pace (0.05 to
        0.25 s): a thousand waiting namespaces must not wake the loop twenty thousand times a second."""
        deadline = Mono.now() + limit_s
        poll_s = min(0.25, max(0.05, every_s / 10))
        sampled: Mono | None = None
        while not done():
            if Mono.now() >= deadline:
                return False
            latest = self.latest_head_at()
            if (latest is None or latest.elapsed() > every_s) and (sampled is None or sampled.elapsed() > every_s):
                sampled = Mono.now()
                await self.sample()
            await asyncio.sleep(poll_s)
        return True
