"""Knowledge over time: the "as of" and "valid at" slices of the history (`DocumentStore.history_rows`).

Two timelines (bi-temporal, as in SQL:2011 system-versioned tables or Graphiti's edges):
- system time: a version is in the knowledge base from its acknowledgement until the next version of its
  document or a delete is acknowledged (`acked_at`, `ended_at`);
- world time: a version is true from its `valid_from` until the `valid_from` of the next version of its document,
  or until the delete (its acknowledgement time: a delete carries no valid_from), and not after a version of
  another document that supersedes it is true.

`as_of` T: the knowledge base exactly as it stood at T (versions acknowledged by T, not ended by T).
`valid_at` T: what the documents say was true at T, as the knowledge base stands now (or `as_of`, when both).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kfresh.indexer.documents import Hit
from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import HistoryRow

if TYPE_CHECKING:
    from kfresh.indexer.embedding.embedder import Embedder
    from kfresh.indexer.stores import DocumentStore


def time_slice(
    rows: Sequence[HistoryRow], *, as_of: float | None = None, valid_at: float | None = None
) -> list[HistoryRow]:
    """The versions in the slice, in the order of `rows` (as_of None = now; valid_at None = whatever is current)."""
    known_at = math.inf if as_of is None else as_of
    known = [r for r in rows if r.acked_at <= known_at]

    def ended(r: HistoryRow) -> bool:
        return r.ended_at is not None and r.ended_at <= known_at

    if valid_at is None:
        return [r for r in known if not ended(r)]
    versions: dict[str, list[HistoryRow]] = defaultdict(list)
    for r in known:
        versions[r.doc_id].append(r)
    valid: list[HistoryRow] = []
    for doc_versions in versions.values():
        doc_versions.sort(key=lambda r: r.version)
        for i, r in enumerate(doc_versions):
            if i + 1 < len(doc_versions):
                until = doc_versions[i + 1].valid_from
            elif ended(r):  # the last version known then, ended by a delete
                until = r.ended_at if r.ended_at is not None else math.inf
            else:
                until = math.inf
            if r.valid_from <= valid_at < until:
                valid.append(r)
    superseded = {doc_id for r in valid for doc_id in r.supersedes}
    keep = {(r.doc_id, r.version) for r in valid if r.doc_id not in superseded}
    return [r for r in known if (r.doc_id, r.version) in keep]


def search_slice(
    store: DocumentStore, embedder: Embedder, q: np.ndarray, k: int, filters: Filter, *, as_of: float | None,
    valid_at: float | None, with_vectors: bool = False,
) -> list[Hit]:  # fmt: skip
    """The exact top k chunks of the slice's versions that `filters` selects (an exact scan of their stored
    vectors; chunks of a version replaced before it was ever embedded are embedded now)."""
    versions = [r for r in time_slice(store.history_rows(known_at=as_of), as_of=as_of, valid_at=valid_at)
                if filters.matches(r.metadata, r.source, r.valid_from)]  # fmt: skip
    chunks = store.slice_chunks(versions)
    if not chunks:
        return []
    missing = [i for i, (_, c) in enumerate(chunks) if c.embedding is None]
    fresh = embedder.encode([chunks[i][1].text for i in missing]) if missing else None
    vectors = np.stack([c.embedding if c.embedding is not None else np.zeros(embedder.dim, np.float32)
                        for _, c in chunks]).astype(np.float32)  # fmt: skip
    if fresh is not None:
        vectors[missing] = fresh
    scores = vectors @ np.asarray(q, dtype=np.float32).reshape(-1)
    best = np.argsort(-scores, kind="stable")[:k]
    return [
        Hit(doc_id=r.doc_id, version=r.version, chunk_id=c.chunk_id, ordinal=c.ordinal, text=c.text,
            score=float(scores[i]), source=r.source, valid_from=r.valid_from, metadata=dict(r.metadata),
            supersedes=r.supersedes, vector=vectors[i] if with_vectors else None, acked_at=r.acked_at)
        for i in best for r, c in [chunks[i]]
    ]  # fmt: skip
