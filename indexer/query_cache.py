"""Query text -> embedding, with a bounded LRU cache in front of the embedder.

Chatbots resend the same question (retries, regenerate, several turns citing one query), and a client
waiting for a document polls with the same text; each miss costs a forward pass on the cores that also
embed the indexing backlog. Only the query vector is cached, never a result: every search still runs
against the live index, so freshness is unaffected. The vector space is the embedder's, and the cache
lives and dies with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from kfresh.core import metrics
from kfresh.indexer.embedding.embedder import Embedder


class QueryEmbeddings:
    """Thread-safe; `size` 0 turns caching off. Cached vectors are read-only, so no caller can corrupt them."""

    def __init__(self, embedder: Embedder, *, size: int) -> None:
        self.embedder = embedder
        self.size = size
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def recent(self, n: int) -> np.ndarray:
        """The `n` most recently used query vectors, (m, dim) with m <= n: real queries, e.g. to tune an index."""
        with self._lock:
            vecs = list(self._entries.values())[-n:]
        return np.stack(vecs) if vecs else np.zeros((0, self.embedder.dim), dtype=np.float32)

    def encode(self, query: str) -> np.ndarray:
        """The unit-norm embedding of `query` (dim,), float32."""
        if self.size <= 0:
            return self.embedder.encode([query])[0]
        with self._lock:
            vec = self._entries.get(query)
            if vec is not None:
                self._entries.move_to_end(query)
        if vec is not None:
            metrics.QUERY_CACHE.labels("hit").inc()
            return vec
        metrics.QUERY_CACHE.labels("miss").inc()
        vec = np.array(self.embedder.encode([query])[0], dtype=np.float32)  # own copy, not a view of a batch
        vec.setflags(write=False)
        with self._lock:
            self._entries[query] = vec
            self._entries.move_to_end(query)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return vec
