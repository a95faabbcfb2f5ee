"""Rows of the document store and the content hash that decides whether a re-ingest is a no-op.

Tables: documents (current version of each document), versions (attributes of each version that still
has chunk rows: an older indexed version keeps answering with its own metadata until it is swapped out),
chunks (chunk_id is the FAISS id; embedding is float32 bytes once embedded), changes (append-only log),
citations (one row per passage an answer showed the model: what the finetuner may prefer to learn),
answers + answer_passages (the answer log: one row per answer, its body JSON, and the versions it showed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kfresh.indexer.documents import DocumentIn

CHUNK_COLUMNS = "chunk_id, doc_id, version, ordinal, text, embedding"  # chunks and history_chunks alike


@dataclass(frozen=True)
class HistoryRow:
    """One version of a document on both timelines: what it said (attributes), when the store acknowledged it and
    when that ended (system time: the next version or a delete; None = still current), from when it is true
    (valid_from; world time)."""

    doc_id: str
    version: int
    valid_from: float
    source: str
    metadata: dict[str, str]
    supersedes: tuple[str, ...]
    acked_at: float
    ended_at: float | None
    ended_by: str | None  # "upsert" | "delete" | None


@dataclass(frozen=True)
class DocState:
    """The current (acknowledged) version of a document."""

    doc_id: str
    version: int
    deleted: bool
    acked_at: float
    indexed_at: float | None
    seq: int


@dataclass(frozen=True)
class DocAttrs:
    """What a filter may ask about one document version: its metadata, source and valid_from."""

    metadata: dict[str, str]
    source: str = ""
    valid_from: float = 0.0


@dataclass(frozen=True)
class ChangeRow:
    """One logged change whose version is still the document's current row (what Watch streams)."""

    seq: int
    doc_id: str
    version: int
    op: str
    acked_at: float
    indexed_at: float | None
    lag_ms: float | None
    attrs: DocAttrs


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: int
    ordinal: int
    text: str
    embedding: np.ndarray | None


@dataclass(frozen=True)
class ChunkHitRow:
    """A chunk joined with its version's attributes and its document's current state, for search results."""

    chunk_id: int
    doc_id: str
    version: int
    ordinal: int
    text: str
    source: str
    valid_from: float
    metadata: dict[str, str]
    supersedes: tuple[str, ...]
    doc_deleted: bool
    embedding: np.ndarray | None


@dataclass(frozen=True)
class DocRecord:
    """A document's current row as the finetuner's selection reads it (deleted ones included)."""

    doc_id: str
    version: int
    source: str
    valid_from: float
    acked_at: float
    supersedes: tuple[str, ...]
    text: str
    deleted: bool


@dataclass(frozen=True)
class LoggedAnswerRow:
    """One row of the answer log: when, the question, and the rest as the server wrote it (JSON, `body`)."""

    answer_id: str
    at: float
    question: str
    body: dict[str, Any]
    replay_of: str = ""  # the logged answer this one replayed


@dataclass(frozen=True)
class Erased:
    """What a purge erased of one deleted document: its rows, and the logged answers that showed it."""

    versions: int
    chunks: int
    citations: int
    answers: int


@dataclass(frozen=True)
class Applied:
    """What the worker made searchable: written back in one transaction per micro-batch."""

    doc_id: str
    version: int
    deleted: bool
    indexed_at: float
    lag_ms: float
    chunk_ids: np.ndarray | None = None
    vectors: np.ndarray | None = None


def content_hash(doc: DocumentIn) -> str:
    """Identity of a document's content: equal hashes mean a re-ingest changes nothing."""
    payload = json.dumps(
        [doc.text, doc.source, sorted(doc.metadata.items()), doc.valid_from, list(doc.supersedes)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def vec_from_blob(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def vec_to_blob(vec: np.ndarray) -> bytes:
    """float32 bytes, the one on-disk form of an embedding in every backend."""
    return np.ascontiguousarray(vec, dtype=np.float32).tobytes()


def hit_from_row(row: Sequence[Any]) -> ChunkHitRow:
    """A ChunkHitRow from (chunk_id, doc_id, version, ordinal, text, source, valid_from, metadata, supersedes,
    deleted, embedding): the column order of every backend's lookup query."""
    return ChunkHitRow(
        chunk_id=int(row[0]),
        doc_id=row[1],
        version=int(row[2]),
        ordinal=int(row[3]),
        text=row[4],
        source=row[5],
        valid_from=float(row[6]),
        metadata=json.loads(row[7]),
        supersedes=tuple(json.loads(row[8])),
        doc_deleted=bool(row[9]),
        embedding=vec_from_blob(row[10]),
    )


def embedded_batch(rows: Sequence[Sequence[Any]]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(doc_ids, versions, chunk_ids, vectors) from (doc_id, version, chunk_id, embedding) rows."""
    return (
        [r[0] for r in rows],
        [int(r[1]) for r in rows],
        np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows)),
        np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows]),
    )


def doc_record(row: Sequence[Any]) -> DocRecord:
    """A DocRecord from (doc_id, version, source, valid_from, acked_at, supersedes, text, deleted)."""
    return DocRecord(
        doc_id=row[0],
        version=int(row[1]),
        source=row[2],
        valid_from=float(row[3]),
        acked_at=float(row[4]),
        supersedes=tuple(json.loads(row[5] or "[]")),
        text=row[6],
        deleted=bool(row[7]),
    )
