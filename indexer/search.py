"""Vector search over a consistent view: ids -> chunk rows -> visible Hits, all under the index read lock."""

from __future__ import annotations

import numpy as np

from kfresh.indexer.documents import Hit
from kfresh.indexer.rows import ChunkHitRow
from kfresh.indexer.state import IndexState
from kfresh.indexer.stores import DocumentStore

# Filters and hidden deletes drop candidates, so ask the index for more than k and widen until enough.
OVERSAMPLE = 4
# Widening stops here: a filter matching almost nothing returns fewer than k hits rather than scanning
# and resolving the whole index on every query.
MAX_CANDIDATES = 16_384


def search_index(
    state: IndexState,
    store: DocumentStore,
    query: np.ndarray,
    k: int,
    filters: dict[str, str] | None = None,
    *,
    with_vectors: bool = False,
) -> list[Hit]:
    """At most k Hits, best first. The lookup runs under the same read lock as the index search, so a
    concurrent swap is either wholly visible or not at all, and old-version rows are never half-swapped."""
    with state.lock.read():
        total = state.index.ntotal
        if total == 0 or k <= 0:
            return []
        hidden = state.hidden_copy()
        limit = min(total, max(MAX_CANDIDATES, k))
        fetch = min(limit, k * OVERSAMPLE if (filters or hidden) else k)
        while True:
            scores, ids = state.index.search(query.reshape(1, -1), fetch)
            hits = _resolve(state, store, scores[0], ids[0], filters, hidden, with_vectors)
            if len(hits) >= k or fetch >= limit:
                break
            fetch = min(limit, fetch * OVERSAMPLE)
    hits.sort(key=lambda h: -h.score)
    return hits[:k]


def _resolve(
    state: IndexState,
    store: DocumentStore,
    scores: np.ndarray,
    ids: np.ndarray,
    filters: dict[str, str] | None,
    hidden: dict[str, int],
    with_vectors: bool,
) -> list[Hit]:
    valid = ids >= 0
    rows = store.lookup(ids[valid].tolist(), with_vectors=with_vectors)
    hits = []
    for score, cid in zip(scores[valid].tolist(), ids[valid].tolist()):
        row = rows.get(cid)
        if row is None or not _visible(row, hidden, filters):
            continue
        vector = None
        if with_vectors:
            vector = row.embedding if row.embedding is not None else state.unsaved.get(cid)
        hits.append(
            Hit(
                doc_id=row.doc_id,
                version=row.version,
                chunk_id=cid,
                ordinal=row.ordinal,
                text=row.text,
                score=float(score),
                source=row.source,
                valid_from=row.valid_from,
                metadata=row.metadata,
                supersedes=row.supersedes,
                vector=vector,
            )
        )
    return hits


def _visible(row: ChunkHitRow, hidden: dict[str, int], filters: dict[str, str] | None) -> bool:
    if row.doc_deleted or row.version < hidden.get(row.doc_id, 0):
        return False
    return not filters or all(row.metadata.get(key) == value for key, value in filters.items())
