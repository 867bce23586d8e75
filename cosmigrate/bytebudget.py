"""Bytes read from the source but not yet in the store: one budget per namespace, under one per process.

Why: `capture.max_unflushed_bytes` must bound a namespace's memory whatever
its partition count, and `capture.max_unflushed_bytes_total` the whole
daemon's, or a 100-partition backfill behind a slow store outgrows
`MemoryMax`. Everything a watcher holds counts, from the moment the driver
holds it: a fetched page (PyMongo buffers a whole getMore answer), the
watcher's unsealed events, and sealed batches queued at the committer. A
watcher reserves room before it asks for a page (`reserve`), turns the
reservation into the page's real size once it arrived (`fetched`), and the
committer gives the bytes back once the batch is in the store (`release`).

A page's size is known only after it arrived, so a reservation is a guess:
the namespace's largest recent page, for every fetch of every stream (more
if the stream's own previous page was larger). A stream's own previous page
is no guide when it was empty or tiny: an idle partition's poll answers
nothing until a burst of writes reaches it, and a burst reaching many idle
partitions at once fills every poll outstanding with a full page. So at most
(limit - held) / largest page polls are outstanding at once, and the idle
latency grows only when partitions x page exceeds the limit (the README's
"Capture memory"). Until its first non-empty page, a namespace opens one
stream at a time (the guess is unknown, and eight concurrent first pages
could hold eight pages), and a poll after an empty page reserves the
namespace's `floor` (capture passes `max_batch_bytes`). A fetch that does
not fit waits for the committer to release bytes; one that would never fit
(a page larger than the limit) goes through once the level holds nothing,
alone, so an oversized page never deadlocks capture. Waiting fetches are
served in arrival order at each level: a fetch joins the process's queue
only once it is first in its namespace's and fits there, so a namespace
waiting on its own full budget (its store slow or failing) never holds up
another namespace. Held bytes thus stay within the limit plus one page (more
only if pages grow beyond every recent one while several are in flight).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class _Waiter:
    """One fetch waiting for room."""

    __slots__ = ("queued", "woken")

    def __init__(self) -> None:
        self.queued = 0
        """In the queues of this many levels, from its namespace's up."""
        self.woken = asyncio.Event()
        """Set when this fetch should check again: it is first in a queue at a level that changed."""


class ByteBudget:
    def __init__(self, limit: int, parent: ByteBudget | None = None, floor: int = 0) -> None:
        self.limit = limit
        self.parent = parent
        self.floor = floor
        """What a poll after an empty page reserves while no page of the namespace was seen yet."""
        self.used = 0
        """Bytes held: fetched pages, unsealed events, sealed batches not yet in the store."""
        self.reserved = 0
        """Room promised to fetches in flight (their pages have not arrived)."""
        self.in_flight = 0
        self.peak = 0
        """The most bytes ever held at once (tests and metrics)."""
        self.largest_page = 0
        self.hint: int | None = None
        """What a fetch with no page size of its own reserves: the largest recent page; None until one was seen."""
        self._root: ByteBudget = parent._root if parent is not None else self
        self._closed = False
        self.held_at_close = 0
        """What `close` gave back for it: 0 after a clean drain (every byte was accounted for)."""
        self._waiters: deque[_Waiter] = deque()
        """Fetches waiting at this level, in arrival order (a stream that asks again at once never starves them).
        A parent's holds only fetches its children's limits let through: one child's full limit holds up no
        other child."""

    def child(self, limit: int, floor: int = 0) -> ByteBudget:
        """A namespace's budget: its bytes count here too."""
        return ByteBudget(limit, self, floor)

    def _levels(self) -> list[ByteBudget]:
        return [self] if self.parent is None else [self, *self.parent._levels()]

    def _room_at(self, level: ByteBudget, need: int | None) -> bool:
        if need is None:
            if self.in_flight:
                return False  # the page size is unknown yet: one fetch at a time
            need = 0
        held = level.used + level.reserved
        return not held or held + need <= level.limit  # an empty level lets any page through, alone

    def _fits(self, need: int | None) -> bool:
        return all(self._room_at(level, need) for level in self._levels())

    def _admitted(self, me: _Waiter, need: int | None) -> bool:
        """May `me` fetch now? It queues at each level from its own up, and reaches a parent's queue only while it
        is first at the level below and fits there; held back at one level, it leaves the queues above.
        O(1) for a fetch that waits where it waited before (every waiter checks again at every change)."""
        levels = self._levels()
        for i, level in enumerate(levels):
            if me.queued <= i:
                level._waiters.append(me)
                me.queued = i + 1
            if level._waiters[0] is not me or not self._room_at(level, need):
                for above in levels[i + 1:me.queued]:
                    above._waiters.remove(me)
                me.queued = min(me.queued, i + 1)
                return False
        return True

    def expect(self, last_page: int | None) -> int | None:
        """What a fetch reserves: the namespace's recent largest page, or the stream's previous page if larger.

        A stream's first fetch with no page seen yet: None (one fetch at a time). After an empty page with no
        page seen yet: the floor. Never the size of an empty or tiny previous page alone: the poll of an idle
        partition answers a full page once a burst of writes reaches it, and a burst reaches them all at once.
        """
        if last_page is None:
            return self.hint
        return max(last_page, self.floor if self.hint is None else self.hint)

    def has_room(self, last_page: int | None = None) -> bool:
        """Would a fetch start now?"""
        return not any(level._waiters for level in self._levels()) and self._fits(self.expect(last_page))

    async def reserve(self, last_page: int | None = None, give_up: Callable[[], bool] = lambda: False) -> int | None:
        """Wait for room for one page; the reservation to hand to `fetched` (or `cancel`), or None once
        `give_up()` is true (checked at every change and at `wake`). Fetches are served in arrival order."""
        me = _Waiter()
        try:
            while True:
                me.woken.clear()
                if self._admitted(me, self.expect(last_page)):
                    break
                if give_up():
                    return None
                await me.woken.wait()
        finally:
            for level in self._levels()[:me.queued]:
                level._waiters.remove(me)
            self._notify()  # the next in line may fit too
        need = self.expect(last_page) or 0
        for level in self._levels():
            level.reserved += need
        self.in_flight += 1
        return need

    def fetched(self, reservation: int, nbytes: int) -> None:
        """The page arrived: it holds `nbytes` from now on, in place of its reservation."""
        if self._closed:
            return
        self.in_flight -= 1
        for level in self._levels():
            level.reserved -= reservation
            level.used += nbytes
            level.peak = max(level.peak, level.used)
        if nbytes:
            self.largest_page = max(self.largest_page, nbytes)
            # Follow growth at once, shrink slowly: the first page of a stream is guessed from recent ones.
            hint = self.hint or 0
            self.hint = nbytes if nbytes >= hint else hint - (hint - nbytes) // 8
        self._notify()

    def cancel(self, reservation: int) -> None:
        """The fetch failed: nothing arrived."""
        if self._closed:
            return
        self.in_flight -= 1
        for level in self._levels():
            level.reserved -= reservation
        self._notify()

    def release(self, nbytes: int) -> None:
        """Bytes no longer held (their batch is in the store, or they were dropped)."""
        if nbytes <= 0 or self._closed:
            return
        for level in self._levels():
            level.used -= nbytes
        self._notify()

    def close(self) -> None:
        """The namespace's capture ended (drained, or cancelled with batches still queued): give back to the
        parents whatever it still held or reserved, so a stopped namespace never shrinks the daemon's budget."""
        if self._closed:
            return
        self.held_at_close = self.used + self.reserved
        for level in self._levels()[1:]:
            level.used -= self.used
            level.reserved -= self.reserved
        self.used = self.reserved = self.in_flight = 0
        self._closed = True
        self._notify()

    def wake(self) -> None:
        """Make every waiter of this level check again (their `give_up` may have become true)."""
        for waiter in self._waiters:
            waiter.woken.set()
        self._notify()

    def _notify(self) -> None:
        """Bytes or reservations changed at this level and the ones above: the first fetch in line at each of
        them checks again. Only those can be admitted (the queues are served in arrival order, and a fetch
        joins a parent's queue only as the first of its own), so a change wakes at most one fetch a level.
        Waking every waiter at every change cost a core for 200 idle watchers (each poll woke all of them)."""
        for level in self._levels():
            if level._waiters:
                level._waiters[0].woken.set()
