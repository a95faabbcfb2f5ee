"""FAISS GPU exact search (GpuIndexFlatIP). GPU indexes cannot remove ids, so it runs behind tombstones."""

from __future__ import annotations

from typing import Any

from kfresh.core.errors import Unavailable
from kfresh.indexer.vectors.tombstone import TombstoneIndex

GPU_MAX_K = 2048  # faiss GPU k-selection limit


def gpu_available() -> tuple[bool, str]:
    """(usable, why not) for the faiss build and devices of this process."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a hard dependency
        return False, f"faiss is not importable ({exc})"
    if not hasattr(faiss, "StandardGpuResources"):
        return False, f"faiss {faiss.__version__} was built without GPU support"
    if faiss.get_num_gpus() < 1:
        return False, "faiss sees no CUDA device"
    return True, ""


def create_gpu_index(dim: int, *, compact_ratio: float, device: int = 0) -> TombstoneIndex:
    ok, why = gpu_available()
    if not ok:
        raise Unavailable(
            f"index.kind='gpu' is not usable: {why}. Install a CUDA build of faiss "
            "(e.g. pip install faiss-gpu-cu12) on a machine with an NVIDIA GPU, or set index.kind to 'flat' or 'ivf'."
        )
    import faiss

    resources = faiss.StandardGpuResources()

    def make_inner(d: int) -> Any:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = device
        index: Any = faiss.GpuIndexFlatIP(resources, d, cfg)
        index._kfresh_resources = resources  # the index must not outlive its resources
        return index

    return TombstoneIndex(dim, make_inner, compact_ratio=compact_ratio, max_search_k=GPU_MAX_K, kind="gpu")
