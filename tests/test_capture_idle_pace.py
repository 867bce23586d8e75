"""An idle stream pauses between polls, and a head sample that it has not reached ends the pause.

One NamespaceCapture against the sandbox source over TCP (real PyMongo client), the real local store and
SQLite ledger. The pause is made an hour long here (the default grows to `capture.idle_poll_max_s`), so a
write is only read in time when something ends the pause: a head sample that the namespace has not reached,
or a stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import cosmigrate.capture as capture_module
from cosmigrate.backoff import IdlePace
from cosmigrate.capture import NamespaceCapture
from cosmigrate.clock import Mono
from cosmigrate.freshness import Freshness
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import change_stream_tokens, source_client
from cosmigrate.sandbox import Sandbox
from cosmigrate.stores import open_store
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"
HOUR = 3600.0


class HourPace(IdlePace):
    """Two polls without a pause, then an hour each."""

    def next_delay(self) -> float:
        return HOUR if super().next_delay() > 0 else 0.0


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def idle(tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
               ) -> AsyncIterator[tuple[NamespaceCapture, Freshness, Any]]:
    monkeypatch.setattr(capture_module, "IdlePace", HourPace)
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", start_at="now")
    await prepare_backends(cfg)
    sandbox.source.faults.partitions = 1  # one watcher: every pause counted below is its own
    source = source_client(sandbox.source_uri)
    await source.app.c.insert_one({"_id": "exists"})
    store, ledger = open_store(cfg), open_ledger(cfg)
    meta = await ledger.claim(NS, "me")
    fresh = Freshness()
    cap = NamespaceCapture(NS, meta, source, store, ledger, cfg, freshness=fresh)
    task = asyncio.create_task(cap.run())
    try:
        await wait_for(lambda: _true(cap.status.idle_pauses >= 1), 30, what="the idle watcher pausing")
        yield cap, fresh, source
    finally:
        cap.stop()  # ends the hour's pause too: a stop must not wait for it
        await asyncio.wait_for(task, 30)
        await source.close()
        await store.close()
        await ledger.close()


async def _sample(source: Any, fresh: Freshness) -> None:
    at = Mono.now()
    fresh.add_sample(at, await change_stream_tokens(source, NS))


async def test_a_head_sample_the_namespace_has_not_reached_ends_the_pause(idle: Any) -> None:
    cap, fresh, source = idle
    before, pauses = cap.status.committed_events, cap.status.idle_pauses
    await source.app.c.insert_one({"_id": 1, "v": 1})
    await _sample(source, fresh)  # the head moved past the watcher's position: the pause ends
    await wait_for(lambda: _true(cap.status.committed_events > before), 20,
                   what="the write read although the watcher was in an hour's pause")
    # Once it read the write and went idle again, a sample it has reached does not wake it: its pauses go on.
    await wait_for(lambda: _true(cap.status.idle_pauses > pauses), 30, what="the watcher pausing again")
    pauses = cap.status.idle_pauses
    woke: list[int] = []
    fresh.on_behind, wake = (lambda: woke.append(1)), fresh.on_behind
    try:
        await wait_for(lambda: _reached_sample(source, fresh), 30, what="a sample the namespace has reached")
    finally:
        fresh.on_behind = wake
    assert cap.status.idle_pauses == pauses


async def _reached_sample(source: Any, fresh: Freshness) -> bool:
    """Sample once; True when that sample was reached at once (it called no `on_behind`)."""
    calls: list[int] = []
    inner = fresh.on_behind
    fresh.on_behind = lambda: calls.append(1)
    try:
        await _sample(source, fresh)
    finally:
        fresh.on_behind = inner
    return not calls


def test_the_pace_starts_after_two_empty_pages_doubles_to_its_cap_and_resets_on_an_event() -> None:
    pace = IdlePace(cap=2.0)
    delays = [pace.next_delay() for _ in range(7)]
    assert delays[:2] == [0.0, 0.0]
    assert all(0 < d <= 2.0 for d in delays[2:])
    assert 0.25 * 0.75 <= delays[2] <= 0.25 and 1.5 <= delays[-1] <= 2.0
    pace.reset()
    assert pace.next_delay() == 0.0
    assert all(IdlePace(cap=0.0).next_delay() == 0.0 for _ in range(5))


def test_the_pace_stays_at_its_cap_however_long_a_stream_is_idle() -> None:
    """Hours idle are thousands of steps: the delay stays at the cap (2**1024 once raised OverflowError,
    which failed an idle namespace's capture after about 80 minutes, its applier and its sweep loop)."""
    for cap, first, after in ((5.0, 0.25, 2), (5.0, 0.5, 2), (1.0, 0.25, 0)):
        pace = IdlePace(cap, after=after, first=first)
        delays = [pace.next_delay() for _ in range(5000)]
        assert all(0 <= d <= cap for d in delays) and delays[-1] >= 0.75 * cap
