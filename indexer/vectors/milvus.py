"""Milvus as the vector index (pymilvus MilvusClient): a milvus-lite file or a Milvus server, same code.

One collection: an INT64 primary key `id` (the chunk id, auto_id off) and a FLOAT_VECTOR(dim) `vec`,
metric IP, index type index.milvus_index_type. The store stays the source of truth and this collection is
a cache of it, like the FAISS backends, with three differences that follow from the data living in Milvus:

- add() is an upsert, so it is idempotent: a rebuild re-adds every stored vector, and several kfresh
  replicas may write one shared collection. Nothing here ever drops the collection.
- A snapshot holds only a manifest (uri, collection, dim); loading it reconnects to that collection.
- Milvus can hold ids the store no longer knows (written by a replica that was behind the others, or left
  by a crash). They are never returned to a caller: indexer/search.py resolves every hit through the store
  and drops ids without a live row, widening the search when that leaves fewer than k hits. They do count
  in ntotal. Replicas sharing a collection must share one store (PostgreSQL): chunk ids of two unrelated
  stores collide, and a colliding id would resolve to the wrong chunk.
- Milvus failures (server down, timeouts) raise kfresh.core.errors.Unavailable, i.e. gRPC UNAVAILABLE.

Every call uses Strong consistency, so a vector upserted by add() is found by the very next search()
(`kfresh bench backends`, milvus-lite 3.2.2 on 2 cores: a one-vector upsert takes 1.1-1.7 ms p50, and the
first search after it found the vector in 50 of 50 trials at 20k and at 100k vectors). milvus-lite scans
rows not yet sealed into a segment one by one on every search, so after index.milvus_flush_rows written
rows the maintenance hook seals them (local files only).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from kfresh.core.config import IndexConfig
from kfresh.indexer.vectors import milvus_conn as conn
from kfresh.indexer.vectors.base import VectorIndex, as_ids, as_vecs

log = logging.getLogger("kfresh.indexer")

MAX_TOPK = 16_384  # Milvus refuses a larger search limit (search.py's MAX_CANDIDATES is the same)
_ID_BATCH = 4_096  # ids per `id in [...]` query / delete expression
# ids in one filtered search's `id in [...]` expression; a larger subset is scored from the store's vectors
_SUBSET_MAX = 16_384
_UPSERT_BYTES = 4 << 20  # rows per upsert request: ~4 MiB of vectors, well under gRPC's message limit
# A count(*) costs about as much as a search on milvus-lite (both scan every row in Python: ~8 ms at 20k), so
# the count is kept up to date from this process's own writes and re-read only this often, for other replicas'.
_COUNT_TTL_S = 5.0
_MANIFEST = "kfresh-milvus-manifest/1"


class MilvusIndex(VectorIndex):
    """A VectorIndex whose vectors live in a Milvus collection (created on first use, never dropped)."""

    kind = "milvus"

    def __init__(self, dim: int, cfg: IndexConfig, *, create: bool = True) -> None:
        self.dim = dim
        self.cfg = cfg
        self.uri, self.collection = cfg.milvus_uri, cfg.milvus_collection
        self.local = conn.is_local(self.uri)
        self._client: Any = conn.connect(cfg)
        try:
            self.index_type = conn.ensure_collection(self._client, cfg, dim, create=create)
            if self.local:
                self._client.flush(self.collection)  # seal what milvus-lite replayed from its log at open
        except BaseException:
            conn.disconnect(self._client, self.uri)
            raise
        self._unflushed = 0
        self._count: tuple[float, int] | None = None  # (when counted, live count kept current since)

    # -- the VectorIndex contract --------------------------------------------------------------------
    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Upsert: an id already in the collection gets the new vector (idempotent re-adds)."""
        ids = as_ids(ids)
        if not len(ids):
            return
        vecs = as_vecs(vecs, self.dim)
        track = self._count is not None and len(ids) <= _ID_BATCH  # a bulk add (a rebuild) recounts afterwards
        new = len(np.unique(ids)) - len(self.present(ids)) if track else None
        step = max(1, _UPSERT_BYTES // (4 * self.dim))
        for start in range(0, len(ids), step):
            rows = [{conn.ID_FIELD: int(i), conn.VEC_FIELD: v}
                    for i, v in zip(ids[start : start + step].tolist(), vecs[start : start + step])]  # fmt: skip
            with conn.unavailable_on_failure(self.uri, "upsert vectors"):
                self._client.upsert(self.collection, rows, timeout=self.cfg.milvus_timeout_s)
        self._wrote(len(ids), new)

    def remove(self, ids: np.ndarray) -> int:
        """Delete ids; returns how many were in the collection (Milvus's own delete count is the request's)."""
        present = self.present(as_ids(ids))
        for start in range(0, len(present), _ID_BATCH):
            with conn.unavailable_on_failure(self.uri, "delete vectors"):
                self._client.delete(self.collection, ids=present[start : start + _ID_BATCH],
                                    timeout=self.cfg.milvus_timeout_s)  # fmt: skip
        if present:
            self._wrote(len(present), -len(present))
        return len(present)

    def search(self, vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k), best first; -inf / -1 where Milvus has fewer than k vectors."""
        return self._search(vecs, k)

    def search_subset(self, vecs: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """A filtered search inside Milvus, with its own filter expression `id in [...]`, on a FLAT collection
        (exact there); None on approximate index types and past `_SUBSET_MAX` ids, where the caller scores
        the stored vectors instead (exact, but every vector travels from the store)."""
        ids = as_ids(ids)
        if self.index_type != "FLAT" or not 0 < len(ids) <= _SUBSET_MAX:
            return None
        return self._search(vecs, min(k, len(ids)), f"{conn.ID_FIELD} in {ids.tolist()}")

    def _search(self, vecs: np.ndarray, k: int, expression: str = "") -> tuple[np.ndarray, np.ndarray]:
        q = as_vecs(vecs, self.dim)
        scores, found = self._empty(len(q), max(k, 0))
        if k <= 0 or not len(q):
            return scores, found
        limit = min(k, MAX_TOPK)
        params = {"metric_type": "IP", "params": conn.search_params(self.cfg, self.index_type, limit)}
        with conn.unavailable_on_failure(self.uri, "search"):
            result = self._client.search(
                self.collection,
                data=list(q),
                filter=expression,
                limit=limit,
                anns_field=conn.VEC_FIELD,
                search_params=params,
                output_fields=[conn.ID_FIELD],
                consistency_level="Strong",
                timeout=self.cfg.milvus_timeout_s,
            )
        for row, hits in enumerate(result):
            n = min(len(hits), k)
            found[row, :n] = [int(h["id"]) for h in hits[:n]]
            scores[row, :n] = [float(h["distance"]) for h in hits[:n]]
        return scores, found

    @property
    def ntotal(self) -> int:
        """Live vectors in the collection: a count(*) query, kept current through this process's own writes and
        re-read every few seconds (another replica's writes to a shared collection show up within that)."""
        now = time.monotonic()
        if self._count is None or now - self._count[0] > _COUNT_TTL_S:
            with conn.unavailable_on_failure(self.uri, "count vectors"):
                rows = self._client.query(self.collection, filter="", output_fields=["count(*)"],
                                          consistency_level="Strong", timeout=self.cfg.milvus_timeout_s)  # fmt: skip
            self._count = (now, int(rows[0]["count(*)"]))
        return self._count[1]

    def present(self, ids: np.ndarray) -> list[int]:
        """Which of `ids` the collection holds (each once)."""
        unique = np.unique(as_ids(ids)).tolist()
        out: list[int] = []
        for start in range(0, len(unique), _ID_BATCH):
            batch = unique[start : start + _ID_BATCH]
            with conn.unavailable_on_failure(self.uri, "look up ids"):
                rows = self._client.query(self.collection, filter=f"{conn.ID_FIELD} in {batch}",
                                          output_fields=[conn.ID_FIELD], consistency_level="Strong",
                                          timeout=self.cfg.milvus_timeout_s)  # fmt: skip
            out.extend(int(r[conn.ID_FIELD]) for r in rows)
        return out

    def _wrote(self, rows: int, delta: int | None) -> None:
        """Account for a write of `rows` rows that changed the live count by `delta` (None: unknown)."""
        self._unflushed += rows
        if delta is None or self._count is None:
            self._count = None
        else:
            self._count = (self._count[0], self._count[1] + delta)

    # -- maintenance: seal milvus-lite's unsealed rows ------------------------------------------------
    def needs_maintenance(self) -> bool:
        limit = self.cfg.milvus_flush_rows
        return self.local and limit > 0 and self._unflushed >= limit

    def prepare_maintenance(self) -> object:
        """Flush here, off the writer's lock: it changes how rows are stored, never what a search returns."""
        self.flush()
        return None

    def flush(self) -> None:
        """Seal written rows into segments (milvus-lite: indexed and persisted; a server does it itself)."""
        started = time.perf_counter()
        with conn.unavailable_on_failure(self.uri, "flush"):
            self._client.flush(self.collection, timeout=self.cfg.milvus_timeout_s)
        log.debug("milvus.flushed rows=%d ms=%.1f", self._unflushed, (time.perf_counter() - started) * 1000)
        self._unflushed = 0

    # -- snapshots: a manifest, the vectors stay in Milvus ------------------------------------------
    def to_bytes(self) -> bytes:
        """The manifest; a local file is flushed first so the snapshot claims only what milvus-lite persisted."""
        if self.local and self._unflushed:
            self.flush()
        manifest = {"format": _MANIFEST, "uri": self.uri, "collection": self.collection, "dim": self.dim}
        return json.dumps(manifest).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, dim: int, cfg: IndexConfig) -> MilvusIndex:
        """Reconnect to the manifest's collection; ValueError when it is not the configured one (the caller
        then rebuilds into the configured collection) or no longer exists."""
        try:
            manifest = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a milvus index manifest: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST:
            raise ValueError("not a milvus index manifest")
        if manifest.get("dim") != dim:
            raise ValueError(f"snapshot index has dim {manifest.get('dim')}, expected {dim}")
        if (
            not conn.same_uri(str(manifest.get("uri")), cfg.milvus_uri)
            or manifest.get("collection") != cfg.milvus_collection
        ):
            raise ValueError(f"snapshot names Milvus {manifest.get('uri')}/{manifest.get('collection')}, "
                             f"configured {cfg.milvus_uri}/{cfg.milvus_collection}")  # fmt: skip
        return cls(dim, cfg, create=False)

    def close(self) -> None:
        """Release the connection (and, for the last user of a local file, its milvus-lite server)."""
        if self._client is not None:
            conn.disconnect(self._client, self.uri)
            self._client = None
