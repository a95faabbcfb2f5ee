"""The seam every vector backend implements: int64 ids, unit vectors, inner-product scores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Buffers (bytes, uint8 arrays) or StreamedParts, written one after another: joining hundreds of MB into one
# bytes object would be a copy that holds the GIL, stalling every other thread of the server meanwhile.
SnapshotParts = tuple[Any, ...]


@runtime_checkable
class StreamedPart(Protocol):
    """A snapshot part produced piece by piece straight into the file (no serialised copy in memory)."""

    nbytes: int

    def write(self, sink: Callable[[bytes], None]) -> None:
        """Call `sink` with consecutive pieces whose lengths add up to nbytes."""
        ...


def as_ids(ids: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def as_vecs(vecs: Any, dim: int) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    return arr


@contextmanager
def threads_for(nq: int) -> Iterator[None]:
    """One OpenMP thread for a single query on this thread (the setting is per thread, and restored).

    A one-query scan gains nothing from a second thread, but its spinning barrier loses badly when the
    embedder holds the other core: measured 12-14 ms with one thread vs 46 ms with two at 100k x 384.
    """
    if nq != 1:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# Up to this many ids, a subset search reconstructs their vectors and scores them directly: for a handful of
# ids that takes ~0.02 ms at 100k against ~0.5 ms for an IDSelector pass over the whole index (measured).
FEW_IDS = 256


def exact_top(query: np.ndarray, vecs: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (1, k) and padded with -inf / -1, of the k best of `vecs` (rows of `ids`) for one query."""
    scores = np.asarray(vecs, dtype=np.float32) @ np.asarray(query, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:k]
    out_s = np.full((1, k), -np.inf, dtype=np.float32)
    out_i = np.full((1, k), -1, dtype=np.int64)
    out_s[0, : len(order)] = scores[order]
    out_i[0, : len(order)] = np.asarray(ids, dtype=np.int64)[order]
    return out_s, out_i


class VectorIndex(ABC):
    """A mutable id -> vector index. Not thread-safe for writers; the caller holds the index lock."""

    kind: str
    dim: int

    @abstractmethod
    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors under ids that are not in the index yet."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed."""

    @abstractmethod
    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first; missing results have id -1."""

    def search_deeper(self, vecs: np.ndarray, k: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
        """search() with `factor` times the usual effort where the kind has a knob for it (IVF: nprobe), for a
        post-filtered search whose matches lie deeper in the ranking; exact kinds just search."""
        return self.search(vecs, k)

    def search_subset(self, vecs: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """search() restricted to `ids` and exact over them, or None when this kind cannot restrict a search
        (the caller then scores the stored vectors of `ids`)."""
        return None

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Live vectors."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """A self-contained serialisation for snapshots."""

    def snapshot_later(self) -> Callable[[], SnapshotParts]:
        """to_bytes() in two halves: a cheap copy now (the caller holds the index lock, the worker waits) and
        the serialisation later, on the snapshot thread, as parts whose concatenation is to_bytes(). The
        default serialises now."""
        data = self.to_bytes()
        return lambda: (data,)

    # Maintenance (IVF training, tombstone compaction) is split so the slow half runs while searches go on:
    # prepare_maintenance() only reads the index; apply_maintenance() mutates it under the writer's lock.
    def needs_maintenance(self) -> bool:
        return False

    def prepare_maintenance(self) -> object:
        return None

    def apply_maintenance(self, prepared: object) -> None:
        return None

    def maintain(self) -> None:
        """Both halves at once, for callers that own the index exclusively (rebuilds, tests)."""
        if self.needs_maintenance():
            self.apply_maintenance(self.prepare_maintenance())

    def describe(self) -> str:
        """The kind and its current state in a few words, for Stats (e.g. whether an IVF is trained yet)."""
        return self.kind

    def use_queries(self, source: Callable[[], np.ndarray]) -> None:
        """Offer recent real query vectors ((n, dim), e.g. the query cache's) to a kind that tunes itself on them
        (auto); the others ignore them."""
        return None

    def close(self) -> None:
        """Release outside resources (a Milvus connection); in-memory indexes have none."""
        return None

    def _empty(self, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
