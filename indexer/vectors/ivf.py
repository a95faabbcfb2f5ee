"""Approximate search: FAISS IVFFlat (inner product) with a hashtable direct map so ids can be removed.

Until `train_min` vectors exist the index is exact (flat); then k-means runs on them and everything
migrates. Training runs in prepare_maintenance(), off the writer's lock, so searches keep going.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kfresh.indexer.vectors.base import FEW_IDS, SnapshotParts, VectorIndex, as_ids, as_vecs, exact_top, threads_for
from kfresh.indexer.vectors.flat import FaissStream, FlatIndex, deserialize, serialize

log = logging.getLogger("kfresh.indexer")

_FLAT, _IVF = b"F", b"I"
# k-means needs ~39 points per list to be meaningful and gains little beyond ~256 per list.
_MIN_POINTS_PER_LIST, _MAX_POINTS_PER_LIST = 39, 256


class IvfIndex(VectorIndex):
    kind = "ivf"

    def __init__(self, dim: int, *, nlist: int, nprobe: int, train_min: int) -> None:
        self.dim = dim
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_min = train_min
        self._flat: FlatIndex | None = FlatIndex(dim)
        self._ivf: Any | None = None

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    def describe(self) -> str:
        if self._ivf is None:
            return f"{self.kind}: exact until {self.train_min:,} vectors"
        return f"{self.kind}: IVF nlist={self._ivf.nlist} nprobe={self._ivf.nprobe}"

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = as_ids(ids)
        if not len(ids):
            return
        vecs = as_vecs(vecs, self.dim)
        if self._ivf is None:
            assert self._flat is not None
            self._flat.add(ids, vecs)
        else:
            self._ivf.add_with_ids(vecs, ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = as_ids(ids)
        if not len(ids):
            return 0
        if self._ivf is None:
            assert self._flat is not None
            return self._flat.remove(ids)
        import faiss

        # A hashtable direct map only accepts an explicit id array (not the IDSelectorBatch faiss builds).
        return int(self._ivf.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_vecs(vecs, self.dim)
        if self._ivf is None:
            assert self._flat is not None
            return self._flat.search(q, k)
        if self._ivf.ntotal == 0 or k <= 0:
            return self._empty(len(q), max(k, 0))
        with threads_for(len(q)):
            return self._ivf.search(q, k)

    def search_deeper(self, vecs: np.ndarray, k: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
        if self._ivf is None or factor <= 1.0:
            return self.search(vecs, k)
        import faiss

        q = as_vecs(vecs, self.dim)
        if self._ivf.ntotal == 0 or k <= 0:
            return self._empty(len(q), max(k, 0))
        nprobe = min(self._ivf.nlist, max(self._ivf.nprobe, round(self._ivf.nprobe * factor)))
        with threads_for(len(q)):
            return self._ivf.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))  # type: ignore[call-arg]  # SWIG kwargs

    def search_subset(self, vecs: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every list is probed (only members are scored), so the result is exact, not bounded by nprobe: a
        small matching set may sit in lists the query's nearest centroids never reach."""
        if self._ivf is None:
            assert self._flat is not None
            return self._flat.search_subset(vecs, k, ids)
        import faiss

        q = as_vecs(vecs, self.dim)
        ids = as_ids(ids)
        if self._ivf.ntotal == 0 or k <= 0 or not len(ids):
            return self._empty(len(q), max(k, 0))
        if len(q) == 1 and len(ids) <= FEW_IDS:  # the hashtable direct map reconstructs by id
            return exact_top(q[0], self._ivf.reconstruct_batch(ids), ids, k)
        selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=self._ivf.nlist)  # type: ignore[call-arg]  # SWIG kwargs
        with threads_for(len(q)):
            return self._ivf.search(q, k, params=params)

    @property
    def ntotal(self) -> int:
        if self._ivf is not None:
            return int(self._ivf.ntotal)
        assert self._flat is not None
        return self._flat.ntotal

    # -- training ----------------------------------------------------------------------------------
    def needs_maintenance(self) -> bool:
        return self._ivf is None and self.ntotal >= self.train_min

    def prepare_maintenance(self) -> Any:
        """Train an empty IVF on a sample of the current vectors (read-only on this index)."""
        import faiss

        assert self._flat is not None
        _, vecs = self._flat.export()
        nlist = max(1, min(self.nlist, len(vecs) // _MIN_POINTS_PER_LIST))
        if nlist != self.nlist:
            log.info("ivf.nlist_reduced configured=%d used=%d vectors=%d", self.nlist, nlist, len(vecs))
        sample = vecs
        if len(vecs) > nlist * _MAX_POINTS_PER_LIST:
            rng = np.random.default_rng(0)
            sample = vecs[rng.choice(len(vecs), nlist * _MAX_POINTS_PER_LIST, replace=False)]
        ivf: Any = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(np.ascontiguousarray(sample))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.nprobe = min(self.nprobe, nlist)
        log.info("ivf.trained nlist=%d nprobe=%d sample=%d", nlist, ivf.nprobe, len(sample))
        return ivf

    def apply_maintenance(self, prepared: Any) -> None:
        """Move every current vector (including ones added since training) into the trained index."""
        if prepared is None or self._ivf is not None:
            return
        assert self._flat is not None
        ids, vecs = self._flat.export()
        if len(ids):
            prepared.add_with_ids(vecs, ids)
        self._ivf, self._flat = prepared, None

    # -- snapshots ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        if self._ivf is None:
            assert self._flat is not None
            return _FLAT + self._flat.to_bytes()
        return _IVF + serialize(self._ivf)

    def snapshot_later(self) -> Callable[[], SnapshotParts]:
        if self._ivf is None:
            assert self._flat is not None
            flat = self._flat.snapshot_later()
            return lambda: (_FLAT, *flat())
        import faiss

        copy = faiss.clone_index(self._ivf)  # about half the cost of serialising it under the lock
        return lambda: (_IVF, FaissStream(copy))

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, dim: int, *, nlist: int, nprobe: int, train_min: int) -> IvfIndex:
        index = cls(dim, nlist=nlist, nprobe=nprobe, train_min=train_min)
        index._load(data)
        if index._ivf is not None:
            index._ivf.nprobe = min(nprobe, index._ivf.nlist)
        return index

    def _load(self, data: bytes | memoryview) -> None:
        """Take the flat or trained phase that to_bytes() wrote (a trained IVF with the nprobe it was saved with)."""
        tag, body = bytes(data[:1]), data[1:]
        if tag == _FLAT:
            self._flat, self._ivf = FlatIndex.from_bytes(body, self.dim), None
        elif tag == _IVF:
            ivf = deserialize(body)
            if ivf.d != self.dim:
                raise ValueError(f"snapshot index has dim {ivf.d}, expected {self.dim}")
            self._ivf, self._flat = ivf, None
        else:
            raise ValueError(f"not an {self.kind} index snapshot")
