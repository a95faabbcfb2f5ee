"""Watch: each document change streamed once it is searchable, with the lag the indexer measured.

The stream reads the store's change log (every writer's changes, as WaitSearchable counts them) up to the
index's applied watermark, so a change is sent only after a search can find it. The worker wakes the stream
after each applied batch (ingest_stream.wait_applied); `recheck_s` bounds the wait, so another replica's changes
that this replica's watermark already covers are read too.
A version replaced before the stream read it is skipped, as the index skips it; a client that resumes with
`after_seq` = the last seq it saw misses nothing that is still current.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from kfresh.core.errors import InvalidInput
from kfresh.core.time import to_timestamp
from kfresh.indexer.rows import ChangeRow
from kfresh.indexer.service import Indexer
from kfresh.server import ingest_stream, tenancy
from kfresh.v1 import kfresh_pb2 as pb


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


async def watch(
    indexer: Indexer, after_seq: int, binding: tenancy.Binding, *, recheck_s: float = 0.5, batch: int = 512
) -> AsyncIterator[pb.Change]:
    seen = after_seq
    while True:
        mark = indexer.applied_seq()  # before the read: a batch applied after it ends the wait below at once
        rows = await asyncio.to_thread(indexer.searchable_changes, seen, limit=batch)
        for row in rows:
            seen = row.seq
            if tenancy.owns(row.attrs.metadata, binding):
                yield change_to_proto(row)
        if len(rows) < batch:
            await ingest_stream.wait_applied(indexer, mark + 1, recheck_s)
