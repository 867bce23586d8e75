"""A stop request must never be lost: `within` vs `asyncio.wait_for` on Python 3.11."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from cosmigrate.timeouts import check_cancelled, within


async def _cancel_as_it_finishes(limit: object) -> asyncio.Task[str]:
    """A task cancelled in the same loop turn as the awaitable under its time limit finishes."""
    done = asyncio.Event()

    async def body() -> str:
        await limit(done.wait(), 10)  # type: ignore[operator]
        await asyncio.sleep(30)  # a lost cancellation ends up here
        return "ran on"

    task = asyncio.create_task(body())
    await asyncio.sleep(0.01)
    done.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    return task


async def test_a_cancel_that_meets_a_finishing_await_reaches_the_task() -> None:
    task = await _cancel_as_it_finishes(within)
    assert task.done() and task.cancelled()


@pytest.mark.skipif(not hasattr(asyncio, "timeout") or __import__("sys").version_info >= (3, 12),
                    reason="the wait_for flaw is specific to Python 3.11")
async def test_the_reason_asyncio_wait_for_is_not_used() -> None:
    task = await _cancel_as_it_finishes(asyncio.wait_for)
    try:
        assert not task.done(), "asyncio.wait_for delivered the cancellation: the flaw this module avoids is gone"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_retry_loop_stops_even_after_a_library_swallowed_its_cancellation() -> None:
    attempts = 0

    async def loop() -> None:
        nonlocal attempts
        while True:
            check_cancelled()
            attempts += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass  # what a careless library does

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()


def test_the_daemon_code_never_uses_asyncio_wait_for() -> None:
    root = Path(__file__).resolve().parents[1] / "cosmigrate"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "sandbox" not in p.parts and re.search(r"asyncio\.wait_for\(", p.read_text())]
    assert offenders == [], f"use cosmigrate.timeouts.within instead of asyncio.wait_for in {offenders}"


async def test_a_stop_ends_a_task_that_lost_its_first_cancellation() -> None:
    """What PyMongo's own `wait_for` (connecting a socket) can do on 3.11: the task runs on after one cancel."""
    from cosmigrate.timeouts import cancel_and_wait

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # lost, as in the library
        await asyncio.sleep(30)  # a stop that cancels only once waits here for 30 s

    task = asyncio.create_task(swallows_once())
    await asyncio.sleep(0.01)
    await within(cancel_and_wait([task], resend_s=0.05), 5)
    assert task.cancelled()
