"""Exact search on torch: the GPU index for machines with CUDA torch but no faiss-gpu build (the CPU too).

The vectors live in one (capacity x dim) float32 tensor on the device, grown by doubling; a search is one
matmul against the live rows and a topk, so it is exact like the flat index. A removal moves the last live
rows into the freed slots (swap-remove), so the live rows stay contiguous: no tombstones, no compaction.
Slot -> id stays on the host (numpy), id -> slot in a dict. Snapshots hold the live ids and vectors (npz).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kfresh.core.errors import Unavailable
from kfresh.indexer.vectors.base import SnapshotParts, VectorIndex, as_ids, as_vecs

log = logging.getLogger("kfresh.indexer")

MIN_CAPACITY = 1024


def torch_device(device: str) -> str:
    """'auto' is CUDA when torch sees a GPU, else the CPU; 'cuda' without one is an actionable error."""
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"index.kind='torch' needs torch ({exc}); it comes with sentence-transformers") from exc
    if device == "auto":
        from kfresh.indexer.embedding.embedder import (
            resolve_device,  # the one rule for 'auto', shared with the embedder
        )

        return resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Unavailable(f"index.torch_device={device!r} but torch sees no CUDA device; set it to 'auto' or 'cpu'")
    return device


class TorchIndex(VectorIndex):
    kind = "torch"

    def __init__(self, dim: int, *, device: str = "auto") -> None:
        import torch

        self._torch = torch
        self.dim = dim
        self.device = torch.device(torch_device(device))
        if self.device.type == "cpu":
            log.warning("index.kind=torch on the CPU: its search threads compete with the embedder for the cores "
                        "(freshness p95 245 ms vs 119 ms with flat in the benchmarks); it is meant for CUDA, "
                        "use index.kind=flat or ivf on a CPU-only machine")  # fmt: skip
        self._vecs = torch.empty((MIN_CAPACITY, dim), dtype=torch.float32, device=self.device)
        self._ids = np.zeros(MIN_CAPACITY, dtype=np.int64)  # slot -> id, for the first `_n` slots
        self._slot: dict[int, int] = {}
        self._n = 0

    @property
    def ntotal(self) -> int:
        return self._n

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = as_ids(ids)
        if not len(ids):
            return
        vecs = as_vecs(vecs, self.dim)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        self.remove(ids)  # re-adding an id replaces its vector
        start, end = self._n, self._n + len(ids)
        self._reserve(end)
        self._vecs[start:end] = self._tensor(vecs)
        self._ids[start:end] = ids
        self._slot.update(zip(ids.tolist(), range(start, end)))
        self._n = end

    def _tensor(self, arr: np.ndarray) -> Any:
        """A device tensor of `arr`; read-only arrays (cached query vectors) are copied, torch needs writable ones."""
        return self._torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(self.device)

    def _reserve(self, n: int) -> None:
        capacity = len(self._ids)
        if n <= capacity:
            return
        capacity = max(n, 2 * capacity)
        grown = self._torch.empty((capacity, self.dim), dtype=self._vecs.dtype, device=self.device)
        grown[: self._n] = self._vecs[: self._n]
        self._vecs = grown
        self._ids = np.concatenate([self._ids, np.zeros(capacity - len(self._ids), dtype=np.int64)])

    def remove(self, ids: np.ndarray) -> int:
        freed = [s for s in (self._slot.pop(i, None) for i in as_ids(ids).tolist()) if s is not None]
        if not freed:
            return 0
        new_n = self._n - len(freed)
        gone = set(freed)
        holes = sorted(s for s in freed if s < new_n)  # freed slots inside the new live range
        movers = [s for s in range(new_n, self._n) if s not in gone]  # live slots beyond it, as many
        if holes:
            dst = self._torch.tensor(holes, device=self.device)
            src = self._torch.tensor(movers, device=self.device)
            self._vecs[dst] = self._vecs[src]
            self._ids[holes] = self._ids[movers]
            self._slot.update(zip(self._ids[holes].tolist(), holes))
        self._n = new_n
        return len(freed)

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_vecs(vecs, self.dim)
        if self._n == 0 or k <= 0:
            return self._empty(len(q), max(k, 0))
        take = min(k, self._n)
        with self._torch.inference_mode():
            scores = self._tensor(q) @ self._vecs[: self._n].T
            top = self._torch.topk(scores, take, dim=1)
            top_scores, top_slots = top.values.cpu().numpy(), top.indices.cpu().numpy()
        out_scores, out_ids = self._empty(len(q), k)
        out_scores[:, :take] = top_scores
        out_ids[:, :take] = self._ids[top_slots]
        return out_scores, out_ids

    # -- snapshots ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _npz(self._ids[: self._n], self._vecs[: self._n].cpu().numpy())

    def snapshot_later(self) -> Callable[[], SnapshotParts]:
        ids, vecs = self._ids[: self._n].copy(), self._vecs[: self._n].clone()  # a device copy: cheap on a GPU
        return lambda: (_npz(ids, vecs.cpu().numpy()),)

    def load_bytes(self, data: bytes | memoryview) -> None:
        with np.load(io.BytesIO(data)) as z:
            ids, vecs = z["ids"], z["vecs"]
        self._slot.clear()
        self._n = 0
        self.add(ids, vecs)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, dim: int, *, device: str = "auto") -> TorchIndex:
        index = cls(dim, device=device)
        index.load_bytes(data)
        return index


def _npz(ids: np.ndarray, vecs: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ids=ids, vecs=vecs)
    return buf.getvalue()
