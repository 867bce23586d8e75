"""The two clocks, as two types that cannot be mixed.

Every time in cosmigrate is of exactly one kind:

- `Wall`: the wall clock (seconds since the epoch). Shared across hosts and
  shown to people: ledger records, status and report fields (as ISO text),
  log lines. It can step (NTP, a resumed VM), so it never measures a wait or
  a lag.
- `Mono`: this process's monotonic clock. Waits, deadlines, lag, lease
  expiry. Meaningless outside the process and never stored in the ledger.

A mix of the two was behind three false "ready"/"equal" answers (a
monotonic start compared with a wall catch-up time returns at once). Both
are frozen dataclasses ordered only against their own kind, so `Wall < Mono`
or `Mono - Wall` is a type error under `make check` (mypy) and a TypeError at
run time. Subtracting two times of one kind gives plain seconds (a duration,
`float`); adding seconds to a time gives a time of the same kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, order=True, slots=True)
class Mono:
    """A moment on this process's monotonic clock (`time.monotonic()`)."""

    s: float

    @staticmethod
    def now() -> Mono:
        return Mono(time.monotonic())

    def __add__(self, seconds: float) -> Mono:
        return Mono(self.s + seconds)

    def __sub__(self, other: Mono) -> float:
        """Seconds from `other` to this moment (a duration)."""
        if not isinstance(other, Mono):
            return NotImplemented
        return self.s - other.s

    def minus(self, seconds: float) -> Mono:
        return Mono(self.s - seconds)

    def elapsed(self) -> float:
        """Seconds since this moment."""
        return time.monotonic() - self.s


@dataclass(frozen=True, order=True, slots=True)
class Wall:
    """A moment on the wall clock (`time.time()`, seconds since the epoch, UTC)."""

    s: float

    @staticmethod
    def now() -> Wall:
        return Wall(time.time())

    def __add__(self, seconds: float) -> Wall:
        return Wall(self.s + seconds)

    def __sub__(self, other: Wall) -> float:
        """Seconds from `other` to this moment (a duration; can be negative if the clock stepped)."""
        if not isinstance(other, Wall):
            return NotImplemented
        return self.s - other.s

    def minus(self, seconds: float) -> Wall:
        return Wall(self.s - seconds)

    def iso(self) -> str:
        """ISO 8601 in UTC, to the millisecond (status, reports)."""
        return datetime.fromtimestamp(self.s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def mono_now() -> Mono:
    return Mono(time.monotonic())


def wall_now() -> Wall:
    return Wall(time.time())
