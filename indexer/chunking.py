"""Split a document into overlapping chunks: the unit that is embedded, indexed and returned as a Hit."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from kfresh.core.config import StoreConfig

log = logging.getLogger("kfresh.indexer")


@lru_cache(maxsize=8)
def _splitter(chunk_chars: int, chunk_overlap: int) -> RecursiveCharacterTextSplitter:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    # The config bounds each setting alone; an overlap as large as the chunk would never advance.
    overlap = min(chunk_overlap, chunk_chars // 2)
    if overlap != chunk_overlap:
        log.warning(
            "chunking.overlap_clamped configured=%d used=%d chunk_chars=%d", chunk_overlap, overlap, chunk_chars
        )
    return RecursiveCharacterTextSplitter(chunk_size=chunk_chars, chunk_overlap=overlap)


def split(text: str, cfg: StoreConfig) -> list[str]:
    """Chunks of `text` (never empty for non-blank text: a document always has at least one chunk)."""
    chunks = [c for c in _splitter(cfg.chunk_chars, cfg.chunk_overlap).split_text(text) if c.strip()]
    return chunks or [text.strip()]
