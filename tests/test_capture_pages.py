"""A change-stream page taken at once (`mongo.take_page`) is the same events, in the same order, with the same
resume token afterwards, as reading it event by event with `try_next()`."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from cosmigrate.batchfile import token_bytes
from cosmigrate.mongo import beginning_token, open_change_stream, page_drained, raw_collection, take_page
from cosmigrate.sandbox import Sandbox

N = 230  # pages of 50: the last one short


async def _read(source: AsyncMongoClient[Any], by_page: bool) -> tuple[list[bytes], list[bytes]]:
    """Every event, and the stream's resume token after each page."""
    coll = raw_collection(source, "app.pages")
    events: list[bytes] = []
    tokens: list[bytes] = []
    async with await open_change_stream(coll, beginning_token(), deletes_preview=False, max_await_ms=50,
                                        batch_size=50) as stream:
        while len(events) < N:
            change = await stream.try_next()
            if change is None:
                continue
            events.append(bytes(change.raw))
            if by_page:
                rest = take_page(stream)
                assert rest, "the rest of a page of 50 is taken at once"
                events.extend(rest)
            if page_drained(stream):
                assert stream.resume_token is not None
                tokens.append(token_bytes(stream.resume_token))
    return events, tokens


async def test_a_page_taken_at_once_is_the_page_read_event_by_event(sandbox: Sandbox, source: AsyncMongoClient[Any]) -> None:
    sandbox.source.faults.partitions = 1
    await source.app.pages.insert_many([{"_id": i, "v": "x" * (i % 7)} for i in range(N)])
    one_by_one, tokens = await _read(source, by_page=False)
    paged, paged_tokens = await _read(source, by_page=True)
    assert len(one_by_one) == N and paged == one_by_one
    assert len(tokens) == 5 and paged_tokens == tokens
