"""Durable document stores behind one interface: SQLite (embedded, the default) or PostgreSQL (shared by replicas).

store = open_store(cfg.store)                   # the server's read-write store
store = open_store(cfg.store, read_only=True)   # the finetuner's view: it cannot write
"""

from __future__ import annotations

from kfresh.indexer.rows import Applied, ChunkHitRow, ChunkRow, DocRecord, DocState, content_hash
from kfresh.indexer.stores.base import DocumentStore, StoreError
from kfresh.indexer.stores.factory import open_store, store_exists

__all__ = [
    "Applied", "ChunkHitRow", "ChunkRow", "DocRecord", "DocState", "DocumentStore", "StoreError", "content_hash",
    "open_store", "store_exists",
]  # fmt: skip
