"""The indexer's value types: what goes in (DocumentIn), what comes back (Ack, Hit, IndexStats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

AckStatus = Literal["stored", "unchanged", "deleted", "not_found", "forbidden"]


@dataclass(frozen=True)
class DocumentIn:
    """A document as a client sends it. `valid_from` is unix seconds; None = acknowledgement time."""

    id: str
    text: str
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    valid_from: float | None = None
    supersedes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WriteOp:
    """One change of an ingest stream: an upsert (`doc` and its `chunks`) or a delete of `doc_id` (doc None).
    `owner`: a tenant binding (server/tenancy.py); the store refuses the op ("forbidden") when a live document
    outside it holds the id, checked inside the write's own transaction."""

    doc_id: str
    doc: DocumentIn | None = None
    chunks: tuple[str, ...] = ()
    owner: Mapping[str, str] | None = field(default=None, compare=False)

    @property
    def op(self) -> Literal["upsert", "delete"]:
        return "delete" if self.doc is None else "upsert"


@dataclass(frozen=True)
class Ack:
    """Returned only after the change is durably committed."""

    id: str
    version: int
    status: AckStatus
    chunks: int
    seq: int
    acked_at: float


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk of the newest indexed version of its document."""

    doc_id: str
    version: int
    chunk_id: int
    ordinal: int
    text: str
    score: float
    source: str
    valid_from: float
    metadata: dict[str, str]
    supersedes: tuple[str, ...] = ()
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)
    acked_at: float | None = None  # set by an "as of" / "valid at" search: when the version was acknowledged


@dataclass(frozen=True)
class LagStats:
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class HistoryStats:
    """The history's size (every version kept) and the time-slice searches' latency."""

    versions: int = 0  # history rows: every version acknowledged and not purged
    replaced_chunks: int = 0  # chunk rows of replaced versions (history_chunks)
    memory_bytes: int = 0  # the in-memory copy time-slice searches use (0 until the first one)
    slice_search: LagStats = field(default_factory=LagStats)


@dataclass(frozen=True)
class IndexStats:
    documents: int
    chunks: int
    deleted: int
    pending: int
    indexed_vectors: int
    ingest_docs_per_s: float
    freshness: LagStats
    embedder: str
    index_kind: str
    history: HistoryStats = field(default_factory=HistoryStats)
    index_detail: str = ""  # VectorIndex.describe(): e.g. whether an auto / ivf index is trained yet
    index_maintenance_pending: bool = False  # VectorIndex.needs_maintenance(): training / compaction not yet run
