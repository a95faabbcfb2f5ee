"""Vector index backends behind one interface (base.VectorIndex) and a factory."""

from __future__ import annotations

from kfresh.indexer.vectors.base import VectorIndex
from kfresh.indexer.vectors.factory import create_index, index_from_bytes

__all__ = ["VectorIndex", "create_index", "index_from_bytes"]
