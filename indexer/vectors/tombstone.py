"""Deletes for append-only indexes (FAISS GPU flat cannot remove ids): tombstones, oversampling, compaction.

Each vector lives at a position of the inner index; `pos2id` maps positions to ids and removed positions
are tombstoned. A search asks for k + (tombstones) results so filtering them never loses a live hit, and
the index is rebuilt from its live vectors once tombstones exceed `compact_ratio` of what it holds.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kfresh.indexer.vectors.base import VectorIndex, as_ids, as_vecs, threads_for

log = logging.getLogger("kfresh.indexer")


class TombstoneIndex(VectorIndex):
    """Wraps any append-only faiss index built by `make_inner(dim)` (reset() and reconstruct_n() needed)."""

    def __init__(
        self,
        dim: int,
        make_inner: Callable[[int], Any],
        *,
        compact_ratio: float = 0.2,
        max_search_k: int | None = None,
        kind: str = "tombstone",
    ) -> None:
        self.dim = dim
        self.kind = kind
        self.compact_ratio = compact_ratio
        self.max_search_k = max_search_k  # GPU flat search caps k (2048)
        self._inner = make_inner(dim)
        self._reset_positions(np.zeros(0, dtype=np.int64))
        self.compactions = 0

    def _reset_positions(self, ids: np.ndarray) -> None:
        self._size = len(ids)
        # Position arrays grow by doubling: appending one vector must not copy all of them.
        self._pos2id_buf = np.concatenate([ids, np.zeros(max(16, len(ids)), dtype=np.int64)])
        self._dead_buf = np.zeros(len(self._pos2id_buf), dtype=bool)
        self._id2pos: dict[int, int] = dict(zip(ids.tolist(), range(len(ids))))
        self._ndead = 0

    @property
    def _pos2id(self) -> np.ndarray:
        return self._pos2id_buf[: self._size]

    @property
    def _dead(self) -> np.ndarray:
        return self._dead_buf[: self._size]

    @property
    def ntotal(self) -> int:
        return len(self._id2pos)

    @property
    def tombstones(self) -> int:
        return self._ndead

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = as_ids(ids)
        if not len(ids):
            return
        vecs = as_vecs(vecs, self.dim)
        self.remove(ids)  # re-adding an id replaces its vector
        start, end = self._size, self._size + len(ids)
        if end > len(self._pos2id_buf):
            grow = max(end, 2 * len(self._pos2id_buf)) - len(self._pos2id_buf)
            self._pos2id_buf = np.concatenate([self._pos2id_buf, np.zeros(grow, dtype=np.int64)])
            self._dead_buf = np.concatenate([self._dead_buf, np.zeros(grow, dtype=bool)])
        self._inner.add(vecs)
        self._pos2id_buf[start:end] = ids
        self._dead_buf[start:end] = False
        self._size = end
        self._id2pos.update(zip(ids.tolist(), range(start, end)))

    def remove(self, ids: np.ndarray) -> int:
        positions = [p for p in (self._id2pos.pop(i, None) for i in as_ids(ids).tolist()) if p is not None]
        if positions:
            self._dead[positions] = True
            self._ndead += len(positions)
        return len(positions)

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_vecs(vecs, self.dim)
        stored = len(self._pos2id)
        if self.ntotal == 0 or k <= 0:
            return self._empty(len(q), max(k, 0))
        fetch = min(stored, k + self._ndead)
        if self.max_search_k is not None:
            fetch = min(fetch, self.max_search_k)
        with threads_for(len(q) if self.max_search_k is None else 0):  # GPU search has no OpenMP to tame
            raw_scores, positions = self._inner.search(q, fetch)
        scores, ids = self._empty(len(q), k)
        for row in range(len(q)):
            pos = positions[row]
            keep = pos >= 0
            keep[keep] = ~self._dead[pos[keep]]
            take = np.flatnonzero(keep)[:k]
            scores[row, : len(take)] = raw_scores[row, take]
            ids[row, : len(take)] = self._pos2id[pos[take]]
        return scores, ids

    # -- compaction --------------------------------------------------------------------------------
    def needs_maintenance(self) -> bool:
        return self._ndead > 0 and self._ndead > self.compact_ratio * len(self._pos2id)

    def prepare_maintenance(self) -> object:
        return None  # the rebuild must see the tombstone state at apply time, so all of it runs there

    def apply_maintenance(self, prepared: object) -> None:
        live = np.flatnonzero(~self._dead)
        vecs = self._live_vectors(live)
        ids = self._pos2id[live]
        self._inner.reset()
        if len(ids):
            self._inner.add(vecs)
        self._reset_positions(ids.copy())
        self.compactions += 1
        log.info("tombstone.compacted kind=%s live=%d", self.kind, len(ids))

    def _live_vectors(self, live: np.ndarray) -> np.ndarray:
        total = len(self._pos2id)
        if total == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._inner.reconstruct_n(0, total)[live])

    # -- snapshots: live vectors only, so loading compacts for free ---------------------------------
    def to_bytes(self) -> bytes:
        live = np.flatnonzero(~self._dead)
        buf = io.BytesIO()
        np.savez(buf, ids=self._pos2id[live], vecs=self._live_vectors(live))
        return buf.getvalue()

    def load_bytes(self, data: bytes | memoryview) -> None:
        with np.load(io.BytesIO(data)) as z:
            ids, vecs = z["ids"], z["vecs"]
        self._inner.reset()
        self._reset_positions(np.zeros(0, dtype=np.int64))
        self.add(ids, vecs)

    @classmethod
    def from_bytes(
        cls, data: bytes | memoryview, dim: int, make_inner: Callable[[int], Any], **kwargs: Any
    ) -> TombstoneIndex:
        index = cls(dim, make_inner, **kwargs)
        index.load_bytes(data)
        return index
