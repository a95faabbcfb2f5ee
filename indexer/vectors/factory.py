"""Build the configured vector index, empty or from snapshot bytes."""

from __future__ import annotations

from kfresh.core.config import IndexConfig
from kfresh.indexer.vectors.base import VectorIndex


def create_index(cfg: IndexConfig, dim: int) -> VectorIndex:
    """An empty index of `cfg.kind`; 'gpu' raises kfresh.core.errors.Unavailable without faiss GPU + CUDA, 'torch'
    with torch_device=cuda and no CUDA, 'milvus' without pymilvus. A milvus index is empty only if its collection is new: it connects to what exists."""
    if cfg.kind == "flat":
        from kfresh.indexer.vectors.flat import FlatIndex

        return FlatIndex(dim)
    if cfg.kind == "auto":
        from kfresh.indexer.vectors.auto import AutoIndex

        return AutoIndex(dim, auto_min=cfg.ivf_train_min, recall=cfg.auto_recall)
    if cfg.kind == "ivf":
        from kfresh.indexer.vectors.ivf import IvfIndex

        return IvfIndex(dim, nlist=cfg.ivf_nlist, nprobe=cfg.ivf_nprobe, train_min=cfg.ivf_train_min)
    if cfg.kind == "gpu":
        from kfresh.indexer.vectors.gpu import create_gpu_index

        return create_gpu_index(dim, compact_ratio=cfg.compact_ratio)
    if cfg.kind == "torch":
        from kfresh.indexer.vectors.torch_exact import TorchIndex

        return TorchIndex(dim, device=cfg.torch_device)
    if cfg.kind == "milvus":
        from kfresh.indexer.vectors.milvus import MilvusIndex

        return MilvusIndex(dim, cfg)
    raise ValueError(f"unknown index kind {cfg.kind!r}")


def index_from_bytes(cfg: IndexConfig, dim: int, data: bytes | memoryview) -> VectorIndex:
    """Restore an index of `cfg.kind` written by VectorIndex.to_bytes()."""
    if cfg.kind == "flat":
        from kfresh.indexer.vectors.flat import FlatIndex

        return FlatIndex.from_bytes(data, dim)
    if cfg.kind == "auto":
        from kfresh.indexer.vectors.auto import AutoIndex

        return AutoIndex.restore(data, dim, auto_min=cfg.ivf_train_min, recall=cfg.auto_recall)
    if cfg.kind == "ivf":
        from kfresh.indexer.vectors.ivf import IvfIndex

        return IvfIndex.from_bytes(data, dim, nlist=cfg.ivf_nlist, nprobe=cfg.ivf_nprobe, train_min=cfg.ivf_train_min)
    if cfg.kind == "milvus":
        from kfresh.indexer.vectors.milvus import MilvusIndex

        return MilvusIndex.from_bytes(data, dim, cfg)
    index = create_index(cfg, dim)
    index.load_bytes(data)  # type: ignore[attr-defined]
    return index
