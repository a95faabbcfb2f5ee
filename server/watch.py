"""Watch: each document change streamed once it is searchable, with the lag the indexer measured.

One `ChangeFeed` per server reads the store's change log (every writer's changes, as WaitSearchable counts them)
up to the index's applied watermark, so a change is sent only after a search can find it, and fans each batch
out to every open Watch: one store read per applied batch, however many streams are open. The worker wakes the
feed after each applied batch (ingest_stream.wait_applied); `recheck_s` bounds the wait, so another replica's
changes that this replica's watermark covers are read too. The feed runs while at least one stream is open.

A stream joins at the feed's position P: it reads the log after its `after_seq` up to P from the store itself,
then takes the feed's batches (all after P), so it sees every change once, in seq order. A stream that falls
`queue_batches` behind is cut loose and joins again from its last seq: a slow client costs its own store reads,
never the others' memory. A version replaced before it was read is skipped, as the index skips it; a client that
resumes with `after_seq` = the last seq it saw misses nothing that is still current.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from kfresh.core.errors import InvalidInput
from kfresh.core.time import to_timestamp
from kfresh.indexer.rows import ChangeRow
from kfresh.indexer.service import Indexer
from kfresh.server import ingest_stream, tenancy
from kfresh.v1 import kfresh_pb2 as pb

log = logging.getLogger("kfresh.server.watch")
_CUT = object()  # a subscriber's queue overflowed: it catches up from the store


def start_seq(request: pb.WatchRequest, indexer: Indexer) -> int:
    """The seq the stream starts after; InvalidInput for a negative after_seq or both ways of starting."""
    if request.after_seq < 0:
        raise InvalidInput(f"after_seq must be >= 0; got {request.after_seq}")
    if request.from_now and request.after_seq:
        raise InvalidInput("give after_seq or from_now, not both")
    return indexer.acked_seq() if request.from_now else request.after_seq


def change_to_proto(row: ChangeRow) -> pb.Change:
    searchable_at = row.indexed_at if row.indexed_at is not None else row.acked_at
    lag_ms = row.lag_ms if row.lag_ms is not None else (searchable_at - row.acked_at) * 1000
    return pb.Change(
        seq=row.seq,
        id=row.doc_id,
        version=row.version,
        op=row.op,
        acked_at=to_timestamp(row.acked_at),
        searchable_at=to_timestamp(searchable_at),
        lag_ms=max(lag_ms, 0.0),
        source=row.attrs.source,
        metadata=row.attrs.metadata,
        valid_from=to_timestamp(row.attrs.valid_from),
    )


async def read_log(indexer: Indexer, after: int, upto: int, batch: int) -> tuple[list[ChangeRow], int]:
    """The current-version changes in (after, upto], at most `batch`; and the seq the read covers."""
    rows = await asyncio.to_thread(indexer.searchable_changes, after, upto, limit=batch)
    return rows, (rows[-1].seq if len(rows) == batch else upto)


def _replace_all(queue: asyncio.Queue[object], item: object) -> None:
    """Empty the queue and leave only `item` in it (nothing older may be read after a cut or a failure)."""
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(item)


class ChangeFeed:
    def __init__(self, indexer: Indexer, *, recheck_s: float = 0.5, batch: int = 512, queue_batches: int = 256) -> None:
        self.indexer = indexer
        self.recheck_s, self.batch, self.queue_batches = recheck_s, batch, queue_batches
        self.position = 0
        self._subscribers: set[asyncio.Queue[object]] = set()
        self._task: asyncio.Task[None] | None = None
        self.reads = 0  # store reads made by the feed
        self.cuts = 0  # streams cut loose for falling behind

    def _join(self) -> tuple[asyncio.Queue[object], int]:
        """Subscribe (synchronously: no batch can be dispatched in between); returns the queue and P."""
        if self._task is None or self._task.done():
            self.position = self.indexer.applied_seq()
            self._task = asyncio.create_task(self._run(), name="kfresh-change-feed")
        queue: asyncio.Queue[object] = asyncio.Queue(self.queue_batches)
        self._subscribers.add(queue)
        return queue, self.position

    async def _run(self) -> None:
        try:
            while self._subscribers:
                mark = self.indexer.applied_seq()
                if mark > self.position:
                    rows, covered = await read_log(self.indexer, self.position, mark, self.batch)
                    self.reads += 1
                    self.position = max(self.position, covered)
                    if rows:
                        self._dispatch(rows)
                    if covered < mark:
                        continue  # a full batch: read on before waiting
                await ingest_stream.wait_applied(self.indexer, mark + 1, self.recheck_s)
        except Exception as exc:  # the store failed: every stream ends with it (e.g. UNAVAILABLE)
            log.warning("watch.feed_failed error=%s", exc)
            for queue in self._subscribers:
                _replace_all(queue, exc)

    def _dispatch(self, rows: list[ChangeRow]) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(rows)
            except asyncio.QueueFull:  # cut loose: it re-reads from its last seq, from the store
                self._subscribers.discard(queue)
                self.cuts += 1
                _replace_all(queue, _CUT)

    async def watch(self, after_seq: int, binding: tenancy.Binding) -> AsyncIterator[pb.Change]:
        seen = after_seq
        while True:
            queue, joined_at = self._join()
            try:
                while seen < joined_at:  # catch up from the store, up to where the feed took over
                    rows, covered = await read_log(self.indexer, seen, joined_at, self.batch)
                    for row in rows:
                        if tenancy.owns(row.attrs.metadata, binding):
                            yield change_to_proto(row)
                    seen = covered
                while True:
                    item = await queue.get()
                    if item is _CUT:
                        break
                    if isinstance(item, Exception):
                        raise item
                    assert isinstance(item, list)
                    for row in item:
                        if row.seq > seen and tenancy.owns(row.attrs.metadata, binding):
                            yield change_to_proto(row)
                        seen = max(seen, row.seq)
            finally:
                self._subscribers.discard(queue)
