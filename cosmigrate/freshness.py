"""Freshness: how far behind the source the target really is (the head-position barrier).

An empty change-stream page never proves a watcher is caught up (a throttled
Cosmos stream answers empty pages), and batches that were never read cannot
be timed. So the daemon samples each namespace's *head* with
`GetChangeStreamTokens` every few seconds, time-stamped with the local clock
taken BEFORE the request was sent. Every comparison and every lag uses the
monotonic clock (`Mono`): a wall clock stepped back (NTP, a VM resumed) would
make older samples look newer than the ones that are not caught up, and
now - caught_up_at negative, i.e. lag 0. The wall clock (`Wall`) is only
shown (`caught_up_at`). A sampled moment T is

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

The cost stays flat with many partitions and a long backfill (issue 23): heads
and positions only move forward, so the samples form a pipeline of queues
ordered by time (waiting for a batch to reach them -> reached, waiting for
that batch to be committed -> committed, waiting for it to be applied), and a
sample only ever moves forward through it. A new position is compared with
the oldest waiting sample alone (if it does not reach that head, it reaches
none of the later ones); a new sample is resolved against the recorded
positions by bisection, and none is waited on while an older one still waits.
A position that does not reach the oldest waiting head can never be the first
to reach any later head, so only the newest is kept then: during a backfill
the marks stay at one. Where a head or a position was not monotone after all
(a cutover's stored head, a restart), a sample is only resolved later, by a
higher batch: lag grows, it never claims more.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from cosmigrate.clock import Mono, Wall
from cosmigrate.tokens import Positions, TokenFormatError, positions, reached

MAX_SAMPLES = 4096
MAX_MARKS = 4096


@dataclass
class HeadSample:
    at: Mono  # the monotonic clock before the request was sent
    head: Positions
    wall: Wall  # the wall clock at the same moment, for display only
    seq: int | None = None  # the first batch whose position reached this head, once known


@dataclass
class Freshness:
    """Per-namespace bookkeeping between the head sampler, capture and apply."""

    unknown_reason: str = ""
    """Set when heads cannot be sampled at all (permission, old account): freshness is unknown."""
    last_sample_at: Mono | None = None
    """Monotonic clock of the latest sample."""
    last_sample_error: str = ""
    captured_at: Wall | None = None
    """The latest sampled moment that capture reached (committed); wall clock, for display."""
    caught_up_at: Wall | None = None
    """The latest sampled moment that is captured AND applied; wall clock, for display."""
    caught_up_t: Mono | None = None
    """The same moment on the monotonic clock: what lag and "current" are computed from."""
    latest_is_caught_up: bool = False
    watched_since: Mono = field(default_factory=Mono.now)
    """Monotonic clock when the daemon began watching the namespace: lag's lower bound before any catch-up."""
    latest_head: Positions | None = None
    """The head of the latest successful sample (deletes: has the source changed since a sweep started?)."""
    _waiting: collections.deque[HeadSample] = field(default_factory=collections.deque)
    """Samples no recorded position reaches yet (oldest first)."""
    _reached: collections.deque[HeadSample] = field(default_factory=collections.deque)
    """Samples whose first reaching batch is known, not committed yet (seqs non-decreasing)."""
    _committed: collections.deque[HeadSample] = field(default_factory=collections.deque)
    """Samples whose batch is committed, not applied yet."""
    _marks: list[tuple[Positions, int]] = field(default_factory=list)
    _mark_seqs: list[int] = field(default_factory=list)
    """The seqs of `_marks`, in the same order (non-decreasing: bisected when pruning)."""
    barriers: list[HeadSample] = field(default_factory=list)
    """Heads that must be reached once, kept apart from the samples (the backfill's head at unit creation)."""
    on_behind: Callable[[], None] | None = None
    """Called when a sample is not reached by any recorded position (the source moved): capture then ends its
    idle watchers' pauses, so a change in an idle namespace waits at most one sampling round."""

    # --- inputs ---------------------------------------------------------------------

    def add_sample(self, at: Mono, head_tokens: list[bytes], wall: Wall | None = None) -> None:
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
        if self.last_sample_at is not None and at < self.last_sample_at:
            # Answered after a later-sent sample (concurrent samplers): that one already claims a later moment.
            return
        self.last_sample_at = at
        self.latest_head = head
        sample = HeadSample(at, head, Wall.now() if wall is None else wall)
        self.latest_is_caught_up = False
        if not self._waiting and (seq := self._first_reaching(sample.head)) is not None:
            sample.seq = self._at_least_last(seq)
        if sample.seq is None:
            self._waiting.append(sample)
            if self.on_behind is not None:
                self.on_behind()
        else:
            self._reached.append(sample)
        while self._pending() > MAX_SAMPLES:
            self._drop_oldest()  # dropping the oldest unapplied sample only makes lag larger: safe

    def _pending(self) -> int:
        return len(self._waiting) + len(self._reached) + len(self._committed)

    def _drop_oldest(self) -> None:
        for queue in (self._committed, self._reached, self._waiting):
            if queue:
                queue.popleft()
                return

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
        if self._marks and self._mark_seqs[-1] == seq:
            self._marks[-1] = (pos, seq)
        elif self._mark_seqs and seq < self._mark_seqs[-1]:
            self._restarted(seq)
            self._marks, self._mark_seqs = [(pos, seq)], [seq]
        else:
            self._marks.append((pos, seq))
            self._mark_seqs.append(seq)
            if len(self._marks) > MAX_MARKS:
                cut = len(self._marks) - MAX_MARKS  # older marks only give smaller seqs
                del self._marks[:cut], self._mark_seqs[:cut]
        while self._waiting and reached(pos, self._waiting[0].head):
            sample = self._waiting.popleft()
            sample.seq = self._at_least_last(seq)
            self._reached.append(sample)
        if self._waiting and len(self._marks) > 1:
            # This position does not reach the oldest waiting head; no older one did: none of them can be the
            # first to reach a later (higher) head.
            self._marks, self._mark_seqs = self._marks[-1:], self._mark_seqs[-1:]
        for barrier in self.barriers:
            if barrier.seq is None and reached(pos, barrier.head):
                barrier.seq = seq

    def _restarted(self, seq: int) -> None:
        """Seqs went back to `seq`: a capture restarted from the ledger (`ctl retry` keeps the samples), and the
        batches sealed after `seq` were never committed. Their seqs are handed out again, to other (shorter)
        batches, so whatever they resolved waits again: a sample reached by one of them would otherwise be
        called caught up once the new batch of that number is applied. Committed samples are not touched:
        their seqs are at or below the ledger's committed seq, where a restart starts."""
        while self._reached and (self._reached[-1].seq or 0) > seq:  # seqs non-decreasing: the tail only
            sample = self._reached.pop()
            sample.seq = None
            self._waiting.appendleft(sample)
        for barrier in self.barriers:
            if barrier.seq is not None and barrier.seq > seq:
                barrier.seq = None

    def _at_least_last(self, seq: int) -> int:
        """Keeps the reached samples' seqs non-decreasing (a higher seq is only ever more conservative)."""
        last = self._reached[-1].seq if self._reached else None
        return seq if last is None else max(seq, last)

    def add_barrier(self, head: Positions) -> HeadSample:
        """A head whose first reaching batch is wanted once (`.seq`), never dropped like the samples are.

        Added before capture marks anything (the daemon does so before starting the watcher); the watcher's
        first mark (the stored resume position, seq = last committed) then resolves it after a restart.
        """
        barrier = HeadSample(Mono(0.0), dict(head), Wall(0.0))
        barrier.seq = self._first_reaching(barrier.head)
        self.barriers.append(barrier)
        return barrier

    def _first_reaching(self, head: Positions) -> int | None:
        """The seq of the first recorded mark that reaches `head`, by bisection (positions only move forward;
        where they did not, a later mark that does reach it is found: never one that does not)."""
        if not self._marks or not reached(self._marks[-1][0], head):
            return None
        lo, hi = 0, len(self._marks) - 1  # marks[hi] reaches the head
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(self._marks[mid][0], head):
                hi = mid
            else:
                lo = mid + 1
        return self._marks[hi][1]

    def update(self, committed_seq: int, applied_seq: int) -> None:
        """Advance captured_at / caught_up_at from the ledger's committed and applied seqs."""
        while self._reached and (self._reached[0].seq or 0) <= committed_seq:
            sample = self._reached.popleft()
            self._committed.append(sample)
            self.captured_at = sample.wall
        newest: HeadSample | None = None
        while self._committed and (self._committed[0].seq or 0) <= applied_seq:
            newest = self._committed.popleft()
        if newest is None:
            return
        if self.caught_up_t is None or newest.at > self.caught_up_t:
            self.caught_up_t, self.caught_up_at = newest.at, newest.wall
        self.latest_is_caught_up = not self._pending()
        # Marks whose seq is below what the newest caught-up sample needed can never be the first to reach
        # a later (higher) head: drop them to keep memory bounded by pending batches.
        cut = bisect.bisect_left(self._mark_seqs, newest.seq if newest.seq is not None else 0)
        if cut:
            del self._marks[:cut], self._mark_seqs[:cut]

    # --- outputs --------------------------------------------------------------------

    def lag(self, now: Mono | None = None, since: Mono | None = None, fresh_after: Mono | None = None) -> float:
        """Seconds the target is behind the source, as far as the samples prove it.

        0 only when the latest sample is captured and applied AND was taken at or
        after `fresh_after`: a sample from before the source was last written proves
        nothing about that write, so a stalled sampler must never leave lag at 0.
        With no caught-up sample yet, the lag is at least the time since `since`
        (when this daemon began watching the namespace): a lower bound, never 0.
        """
        now = Mono.now() if now is None else now
        if (self.caught_up_t is not None and self.latest_is_caught_up and self.last_sample_at is not None
                and (fresh_after is None or self.last_sample_at >= fresh_after)):
            return 0.0
        base = self.caught_up_t or (self.watched_since if since is None else since)
        return max(0.0, now - base)

    def current(self, threshold_s: float, now: Mono | None = None) -> bool:
        """Caught up to a head sampled less than `threshold_s` ago."""
        now = Mono.now() if now is None else now
        return self.caught_up_t is not None and now - self.caught_up_t < threshold_s

    @property
    def sampled(self) -> bool:
        return self.last_sample_at is not None
