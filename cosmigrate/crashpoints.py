"""Test-only crash points: a process that SIGKILLs itself at a named step.

Crash-safety tests need kills *between* two steps (after the store put,
before the ledger commit), which random external kills rarely hit. Set
`COSMIGRATE_CRASH_POINTS="after_put=0.05,after_commit=0.02"` and the process
kills itself (a real SIGKILL, no cleanup) with that probability at each step.
Unset in production: `hit()` is then a no-op.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping


class CrashPoints:
    def __init__(self, rates: Mapping[str, float] | None = None) -> None:
        self._rates = dict(rates or {})
        self._rng = random.Random()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CrashPoints:
        spec = env.get("COSMIGRATE_CRASH_POINTS", "")
        rates: dict[str, float] = {}
        for part in spec.split(","):
            name, _, rate = part.strip().partition("=")
            if name:
                rates[name] = float(rate or 1.0)
        return cls(rates)

    def hit(self, name: str) -> None:
        rate = self._rates.get(name)
        if rate and self._rng.random() < rate:
            os.write(2, f"crash point {name}: SIGKILL\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
