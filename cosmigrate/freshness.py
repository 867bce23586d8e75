"""Freshness: how far behind the source the target really is (the head-position barrier).

An empty change-stream page never proves a watcher is caught up (a throttled
Cosmos stream answers empty pages), and batches that were never read cannot
be timed. So the daemon samples each namespace's *head* with
`GetChangeStreamTokens` every few seconds, time-stamped with the local clock
taken BEFORE the request was sent. Every comparison and every lag uses the
monotonic clock: a wall clock stepped back (NTP, a VM resumed) would make
older samples look newer than the ones that are not caught up, and
now - caught_up_at negative, i.e. lag 0. The wall clock is only shown
(`caught_up_at`). A sampled moment T is

- *captured* when capture has committed batches whose resume position is at
  or past T's head in every partition;
- *applied* when the batch that crossed T's head is applied on the target.

`lag_seconds` is 0 when the latest sample is captured and applied, otherwise
now - the latest sampled moment that is (`caught_up_at`). Nothing here is
inferred from silence: no sample, no catch-up, no readiness.

Capture reports positions as `(positions, seq)`: "every event up to these
LSNs is in batches numbered <= seq". It reports one when it seals a batch at
a page boundary, and when a page boundary passes with nothing unsealed (the
stream moved without events for us, e.g. past deletes the feed does not show).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from cosmigrate.tokens import Positions, TokenFormatError, positions, reached

MAX_SAMPLES = 4096
MAX_MARKS = 65536


@dataclass
class HeadSample:
    at: float  # monotonic clock before the request was sent
    head: Positions
    wall: float  # the wall clock at the same moment, for display only
    seq: int | None = None  # the first batch whose position reached this head, once known


@dataclass
class Freshness:
    """Per-namespace bookkeeping between the head sampler, capture and apply."""

    unknown_reason: str = ""
    """Set when heads cannot be sampled at all (permission, old account): freshness is unknown."""
    last_sample_at: float = 0.0
    """Monotonic clock of the latest sample."""
    last_sample_error: str = ""
    captured_at: float = 0.0
    """The latest sampled moment that capture reached (committed); wall clock, for display."""
    caught_up_at: float = 0.0
    """The latest sampled moment that is captured AND applied; wall clock, for display."""
    caught_up_t: float = 0.0
    """The same moment on the monotonic clock: what lag and "current" are computed from."""
    latest_is_caught_up: bool = False
    watched_since: float = field(default_factory=time.monotonic)
    """Monotonic clock when the daemon began watching the namespace: lag's lower bound before any catch-up."""
    _captured_t: float = 0.0
    latest_head: Positions | None = None
    """The head of the latest successful sample (deletes: has the source changed since a sweep started?)."""
    _samples: collections.deque[HeadSample] = field(default_factory=collections.deque)
    _marks: list[tuple[Positions, int]] = field(default_factory=list)
    barriers: list[HeadSample] = field(default_factory=list)
    """Heads that must be reached once, kept apart from the samples (the backfill's head at unit creation)."""

    # --- inputs ---------------------------------------------------------------------

    def add_sample(self, at: float, head_tokens: list[bytes], wall: float | None = None) -> None:
        """A head sampled at `at` (monotonic clock; one token per physical partition); `wall` is for display."""
        head: Positions = {}
        try:
            for token in head_tokens:
                head.update(positions(token))
        except TokenFormatError as exc:
            self.last_sample_error = f"unreadable head token: {exc}"
            return
        if not head:
            self.last_sample_error = "the source returned no head token"
            return
        self.unknown_reason = ""
        self.last_sample_error = ""
        self.last_sample_at = at
        self.latest_head = head
        sample = HeadSample(at, head, at if wall is None else wall)
        self._samples.append(sample)
        self.latest_is_caught_up = False
        while len(self._samples) > MAX_SAMPLES:
            self._samples.popleft()  # dropping the oldest unreached sample only makes lag larger: safe
        self._resolve(sample)

    def mark(self, token: bytes, seq: int) -> None:
        """Capture: every event up to `token`'s position is in batches <= seq."""
        try:
            pos = positions(token)
        except TokenFormatError:
            return  # freshness stays where it was: never claims more than it can read
        self.mark_positions(pos, seq)

    def mark_positions(self, pos: Positions, seq: int) -> None:
        """Capture per partition: every event up to these LSNs (one per partition range) is in batches <= seq."""
        if not pos:
            return
        if self._marks and self._marks[-1][1] == seq:
            self._marks[-1] = (pos, seq)
        else:
            self._marks.append((pos, seq))
            if len(self._marks) > MAX_MARKS:
                del self._marks[: len(self._marks) - MAX_MARKS]  # older marks only give smaller seqs
        for sample in self._samples:
            if sample.seq is None and reached(pos, sample.head):
                sample.seq = seq
        for barrier in self.barriers:
            if barrier.seq is None and reached(pos, barrier.head):
                barrier.seq = seq

    def add_barrier(self, head: Positions) -> HeadSample:
        """A head whose first reaching batch is wanted once (`.seq`), never dropped like the samples are.

        Added before capture marks anything (the daemon does so before starting the watcher); the watcher's
        first mark (the stored resume position, seq = last committed) then resolves it after a restart.
        """
        barrier = HeadSample(0.0, dict(head), 0.0)
        self._resolve(barrier)
        self.barriers.append(barrier)
        return barrier

    def _resolve(self, sample: HeadSample) -> None:
        for pos, seq in self._marks:
            if reached(pos, sample.head):
                sample.seq = seq
                return

    def update(self, committed_seq: int, applied_seq: int) -> None:
        """Advance captured_at / caught_up_at from the ledger's committed and applied seqs."""
        for sample in self._samples:
            if sample.seq is not None and sample.seq <= committed_seq and sample.at > self._captured_t:
                self._captured_t, self.captured_at = sample.at, sample.wall
        done = [s for s in self._samples if s.seq is not None and s.seq <= applied_seq and s.seq <= committed_seq]
        if not done:
            return
        newest = max(done, key=lambda s: s.at)
        if newest.at > self.caught_up_t:
            self.caught_up_t, self.caught_up_at = newest.at, newest.wall
        self.latest_is_caught_up = newest is self._samples[-1]
        while self._samples and self._samples[0].at < newest.at:
            self._samples.popleft()
        # Marks whose seq is below what the newest caught-up sample needed can never be the first to reach
        # a later (higher) head: drop them to keep memory bounded by pending batches.
        need = newest.seq if newest.seq is not None else 0
        self._marks = [m for m in self._marks if m[1] >= need]

    # --- outputs --------------------------------------------------------------------

    def lag(self, now: float | None = None, since: float | None = None, fresh_after: float = 0.0) -> float:
        """Seconds the target is behind the source, as far as the samples prove it.

        0 only when the latest sample is captured and applied AND was taken at or
        after `fresh_after`: a sample from before the source was last written proves
        nothing about that write, so a stalled sampler must never leave lag at 0.
        With no caught-up sample yet, the lag is at least the time since `since`
        (when this daemon began watching the namespace): a lower bound, never 0.
        Every argument is on the monotonic clock.
        """
        now = time.monotonic() if now is None else now
        if self.caught_up_t and self.latest_is_caught_up and self.last_sample_at >= fresh_after:
            return 0.0
        base = self.caught_up_t or (self.watched_since if since is None else since)
        return max(0.0, now - base)

    def current(self, threshold_s: float, now: float | None = None) -> bool:
        """Caught up to a head sampled less than `threshold_s` ago (monotonic clock)."""
        now = time.monotonic() if now is None else now
        return bool(self.caught_up_t) and now - self.caught_up_t < threshold_s

    @property
    def sampled(self) -> bool:
        return self.last_sample_at > 0
