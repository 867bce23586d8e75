"""An idle applier polls the ledger less and less often, and a commit's wake applies at once.

One applier driven directly against the real sandbox target (TCP, PyMongo async), the real store and SQLite
ledger. The idle pause is made an hour long here, so a batch is only applied in time when the commit's wake
(what the daemon's capture sends after each commit) ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import cosmigrate.apply as apply_module
from cosmigrate.backoff import IdlePace
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from tests.applyharness import Harness, event
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"
HOUR = 3600.0


class HourPace(IdlePace):
    """The configured poll twice, then an hour each."""

    def next_delay(self) -> float:
        return HOUR if super().next_delay() > 0 else 0.0


class CountingLedger:
    """The real ledger; counts the applier's polls (`list_batches`)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.polls = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list_batches(self, *args: Any, **kwargs: Any) -> Any:
        self.polls += 1
        return await self.inner.list_batches(*args, **kwargs)


@pytest.fixture
async def harness(tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    monkeypatch.setattr(apply_module, "IdlePace", HourPace)
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.apply.poll_interval_s = 0.05
    await prepare_backends(cfg)
    client = target_client(sandbox.target_uri, sandbox.target_ca_file, serverSelectionTimeoutMS=5000)
    h = Harness(cfg, client)
    try:
        yield h
    finally:
        await h.close()
        await client.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_commit_wakes_an_applier_in_its_idle_pause_and_a_stop_ends_it(harness: Harness) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 1})])
    counting = CountingLedger(harness.ledger)
    app = harness.applier(NS, epoch)
    app.ledger = counting  # type: ignore[assignment]
    task = harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 20, what="the first batch applied")
    # Nothing pending: two polls at the configured pace, then the pause (an hour here).
    await wait_for(lambda: _true(counting.polls >= 4), 20, what="the idle polls")
    polls = counting.polls
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 2})])  # wakes the applier, as capture does
    await wait_for(lambda: _true(app.status.applied_seq == 1), 20, what="the batch applied although the applier paused")
    assert counting.polls > polls
    assert (await harness.target.app.c.find_one({"_id": 1}))["v"] == 2
    await wait_for(lambda: _true(counting.polls >= polls + 3), 20, what="the applier pausing again")
    app.stop()  # ends the hour's pause too
    await asyncio.wait_for(task, 20)
    assert app.status.state == "stopped"
