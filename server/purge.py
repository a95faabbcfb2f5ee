"""Purge: erase a document everywhere this server keeps it (issue 19, item 4), the domain behind the Purge RPC.

A plain delete keeps the document's last text as a tombstone and its earlier answers in the log; a purge is an
erasure: the delete (when the document is live) goes through the log and the index like any delete, so replicas
drop it and the finetuner withdraws adapters that learned it; then the store erases every row of the document
(`DocumentStore.erase`), the review queue its items, and a new snapshot replaces the one that held its vectors.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kfresh.indexer.documents import Ack
from kfresh.indexer.rows import Erased
from kfresh.server.ingest_stream import require_applied

if TYPE_CHECKING:
    from kfresh.finetuner.review import ReviewQueue
    from kfresh.indexer.service import Indexer

log = logging.getLogger("kfresh.purge")


@dataclass(frozen=True)
class PurgeResult:
    ack: Ack
    erased: Erased
    review_items: int
    snapshot_written: bool


async def purge(indexer: Indexer, doc_id: str, review: ReviewQueue, *, timeout_s: float) -> PurgeResult:
    """Delete and erase `doc_id`; returns once its delete is in the index and (within `timeout_s`) in a snapshot."""
    ack, erased = await asyncio.to_thread(indexer.purge, doc_id)
    if ack.status == "deleted":
        await require_applied(indexer, ack.seq, timeout_s)  # out of the index before the snapshot is taken
    written = await asyncio.to_thread(indexer.snapshot_at_least, indexer.applied_seq(), timeout_s)
    items = await asyncio.to_thread(review.erase_document, doc_id)
    log.info("purged doc_id=%s answers=%d review_items=%d snapshot=%s", doc_id, erased.answers, items, written)
    return PurgeResult(ack, erased, items, written)
