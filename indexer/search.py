"""Vector search over a consistent view: ids -> chunk rows -> visible Hits, all under the index read lock.

A filter (filters.py: metadata equality and IN lists, source globs, a valid_from range) is planned on the
metadata index (metaindex.py), which names the matching chunk ids exactly:
- none match: nothing to search;
- at most PREFILTER_SHARE of the index matches: only those chunks are scored (FAISS search with an
  IDSelector on flat and IVF, which then probes every list; a scan of their stored vectors on other kinds),
  so the result is the exact filtered top k at any selectivity, down to a single document;
- a larger share (estimated from the postings' sizes, before any id is named): the index is searched and the
  matches kept (post-filtering), widening until k match or the whole index was seen; on exact indexes that
  is exact too, on IVF as good as its nprobe, and a short result is completed by scoring every match.
Fewer than k hits therefore means fewer than k chunks match (on flat and IVF below the share, and on every
exact index): the reply holds all of them.
"""

from __future__ import annotations

import math

import numpy as np

from kfresh.indexer.documents import Hit
from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import ChunkHitRow
from kfresh.indexer.state import IndexState
from kfresh.indexer.stores import DocumentStore

# Hidden deletes (and a filter's misses) drop candidates, so ask the index for more than k and widen until enough.
OVERSAMPLE = 4
# Without a filter, widening stops here: only hidden deletes drop candidates, so this is never reached in practice.
MAX_CANDIDATES = 16_384
# A filter matching at most this share of the indexed chunks scores only the matching chunks. Measured on flat at
# 100k: scoring 1% through an IDSelector takes ~1 ms against ~7 ms for the whole index; at 50% the selector
# itself costs more (~14 ms) than searching everything and dropping the other half.
PREFILTER_SHARE = 0.25


def search_index(
    state: IndexState,
    store: DocumentStore,
    query: np.ndarray,
    k: int,
    filters: Filter | None = None,
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
        q = query.reshape(1, -1)
        if not filters:
            hits = _post_filter(state, store, q, k, None, hidden, with_vectors,
                                first=k * OVERSAMPLE if hidden else k, limit=min(total, max(MAX_CANDIDATES, k)))  # fmt: skip
        else:
            # A common value is searched as usual and its matches kept; naming its tens of thousands of chunk
            # ids first would cost more than the search (~70 ms for half of 100k documents, measured).
            docs = max(1, len(state.meta))
            share = state.meta.estimate(filters) / docs
            hits = []
            if share > PREFILTER_SHARE:
                first = math.ceil(k * OVERSAMPLE / share)
                # Two widenings at most: conditions that each match much but rarely together fall through to
                # the exact path below instead of resolving the whole index row by row.
                limit = min(total, first * OVERSAMPLE * OVERSAMPLE)
                # An approximate index probes 1/share as deep: the filtered top k lie that much further down.
                hits = _post_filter(state, store, q, k, filters, hidden, with_vectors, first=first, limit=limit,
                                    depth=1 / share)  # fmt: skip
            if len(hits) < k:  # a selective filter, or an approximate index (IVF) saw only part of the matches
                ids = matching_ids(state, filters)
                if len(ids) == 0:
                    return []
                hits = _pre_filter(state, store, q, k, ids, filters, hidden, with_vectors)
    hits.sort(key=lambda h: -h.score)
    return hits[:k]


def matching_ids(state: IndexState, filters: Filter) -> np.ndarray:
    """The indexed chunk ids of every document `filters` selects (call under the read lock)."""
    parts = [state.docmap.ids(doc_id) for doc_id in state.meta.matching(filters)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _post_filter(
    state: IndexState,
    store: DocumentStore,
    q: np.ndarray,
    k: int,
    filters: Filter | None,
    hidden: dict[str, int],
    with_vectors: bool,
    *,
    first: int,
    limit: int,
    depth: float = 1.0,
) -> list[Hit]:
    fetch = min(limit, max(first, k))
    while True:
        scores, ids = state.index.search_deeper(q, fetch, depth) if depth > 1 else state.index.search(q, fetch)
        hits = _resolve(state, store, scores[0], ids[0], filters, hidden, with_vectors)
        if len(hits) >= k or fetch >= limit:
            return hits
        fetch = min(limit, fetch * OVERSAMPLE)


def _pre_filter(
    state: IndexState,
    store: DocumentStore,
    q: np.ndarray,
    k: int,
    ids: np.ndarray,
    filters: Filter,
    hidden: dict[str, int],
    with_vectors: bool,
) -> list[Hit]:
    """Score only `ids`: through the index where it can restrict a search to ids, else over stored vectors."""
    limit = len(ids)
    fetch = min(limit, k * OVERSAMPLE if hidden else k)
    scanned: tuple[np.ndarray, np.ndarray] | None = None
    while True:
        found = state.index.search_subset(q, fetch, ids)
        if found is None:  # this kind cannot restrict a search: score the stored vectors once
            scanned = scanned or _scan(state, store, q, ids)
            order = np.argsort(-scanned[0], kind="stable")[:fetch]
            found = scanned[0][order][None, :], scanned[1][order][None, :]
        scores, got = found
        hits = _resolve(state, store, scores[0], got[0], filters, hidden, with_vectors)
        if len(hits) >= k or fetch >= limit:
            return hits
        fetch = min(limit, fetch * OVERSAMPLE)


def _scan(state: IndexState, store: DocumentStore, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of `ids` from their stored vectors (or the ones applied but not saved yet)."""
    rows = store.lookup(ids.tolist(), with_vectors=True)
    kept, vecs = [], []
    for cid in ids.tolist():
        row = rows.get(cid)
        vec = row.embedding if row is not None and row.embedding is not None else state.unsaved.get(cid)
        if vec is not None:
            kept.append(cid)
            vecs.append(vec)
    if not kept:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    scores = np.stack(vecs).astype(np.float32) @ q.reshape(-1).astype(np.float32)
    return scores, np.asarray(kept, dtype=np.int64)


def _resolve(
    state: IndexState,
    store: DocumentStore,
    scores: np.ndarray,
    ids: np.ndarray,
    filters: Filter | None,
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


def _visible(row: ChunkHitRow, hidden: dict[str, int], filters: Filter | None) -> bool:
    if row.doc_deleted or row.version < hidden.get(row.doc_id, 0):
        return False
    return not filters or filters.matches(row.metadata, row.source, row.valid_from)
