"""Exact search: FAISS IndexIDMap2 over IndexFlatIP. The default; ids can be removed (O(n) per batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kfresh.indexer.vectors.base import FEW_IDS, SnapshotParts, VectorIndex, as_ids, as_vecs, exact_top, threads_for


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


class FaissStream:
    """A faiss index as a StreamedPart: faiss.write_index through a callback, 1 MiB at a time. A counting pass
    first gives the length (the snapshot header precedes the index), so neither pass holds the whole
    serialisation in memory; the old way made ~5 copies of it (writer buffer growth, array, rebuild)."""

    CHUNK = 1 << 20

    def __init__(self, index: Any) -> None:
        self.index = index
        total = 0

        def count(piece: bytes) -> None:
            nonlocal total
            total += len(piece)

        self.write(count)
        self.nbytes = total

    def write(self, sink: Callable[[bytes], None]) -> None:
        import faiss

        faiss.write_index(self.index, faiss.PyCallbackIOWriter(sink, self.CHUNK))  # type: ignore[attr-defined]  # SWIG, not in faiss' stubs


def deserialize(data: bytes | memoryview) -> Any:
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class FlatIndex(VectorIndex):
    kind = "flat"

    def __init__(self, dim: int, *, faiss_index: Any | None = None) -> None:
        import faiss

        self.dim = dim
        self._index: Any = faiss_index if faiss_index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = as_ids(ids)
        if len(ids):
            self._index.add_with_ids(as_vecs(vecs, self.dim), ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = as_ids(ids)
        return int(self._index.remove_ids(ids)) if len(ids) else 0

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_vecs(vecs, self.dim)
        if self._index.ntotal == 0 or k <= 0:
            return self._empty(len(q), max(k, 0))
        with threads_for(len(q)):
            scores, ids = self._index.search(q, k)
        return scores, ids

    def search_subset(self, vecs: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        q = as_vecs(vecs, self.dim)
        ids = as_ids(ids)
        if self._index.ntotal == 0 or k <= 0 or not len(ids):
            return self._empty(len(q), max(k, 0))
        if len(q) == 1 and len(ids) <= FEW_IDS:
            return exact_top(q[0], self._index.reconstruct_batch(ids), ids, k)
        selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))  # ids stays referenced until the search returns
        with threads_for(len(q)):
            return self._index.search(q, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors), e.g. to train an IVF index on them."""
        import faiss

        n = self._index.ntotal
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vecs = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), dtype=np.float32)
        return ids, vecs

    def to_bytes(self) -> bytes:
        return serialize(self._index)

    def snapshot_later(self) -> Callable[[], SnapshotParts]:
        # One copy under the lock (faiss releases the GIL); the snapshot thread streams it into the file.
        import faiss

        copy = faiss.clone_index(self._index)
        return lambda: (FaissStream(copy),)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, dim: int) -> FlatIndex:
        index = deserialize(data)
        if index.d != dim:
            raise ValueError(f"snapshot index has dim {index.d}, expected {dim}")
        return cls(dim, faiss_index=index)
