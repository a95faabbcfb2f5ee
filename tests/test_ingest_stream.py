"""Group commit on the Ingest stream: what has arrived is committed together, in order, with nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kfresh.server.ingest_stream import read_groups


async def _source(n: int, *, delay_s: float = 0.0, fail_after: int | None = None) -> AsyncIterator[int]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise ConnectionError("client went away")
        if delay_s:
            await asyncio.sleep(delay_s)
        yield i


async def _collect(source: AsyncIterator[int], max_items: int) -> list[list[int]]:
    return [group async for group in read_groups(source, max_items)]  # type: ignore[arg-type]


def test_a_burst_is_grouped_in_order_up_to_the_limit() -> None:
    groups = asyncio.run(_collect(_source(50), 8))
    assert [x for g in groups for x in g] == list(range(50))
    assert all(1 <= len(g) <= 8 for g in groups)
    assert len(groups) <= 12  # grouped, not one transaction per message


def test_a_trickle_commits_each_message_at_once() -> None:
    groups = asyncio.run(_collect(_source(5, delay_s=0.02), 8))
    assert groups == [[0], [1], [2], [3], [4]]


def test_a_broken_stream_still_yields_what_arrived_then_raises() -> None:
    seen: list[int] = []

    async def run() -> None:
        async for group in read_groups(_source(10, fail_after=6), 4):  # type: ignore[arg-type]
            seen.extend(group)

    with pytest.raises(ConnectionError):
        asyncio.run(run())
    assert seen == list(range(6))


def test_max_one_is_a_transaction_per_message() -> None:
    assert asyncio.run(_collect(_source(6), 1)) == [[i] for i in range(6)]
