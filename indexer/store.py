"""Durable document store: SQLite in WAL mode with synchronous=FULL, so an Ack survives SIGKILL and power loss.

The store is the source of truth; the vector index is a cache of it that can always be rebuilt from the
embeddings kept here. One writer connection (serialised by a lock) and one reader connection per thread.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kfresh.indexer.documents import Ack, DocumentIn
from kfresh.indexer.rows import SCHEMA, Applied, ChunkHitRow, ChunkRow, DocState, content_hash, vec_from_blob

__all__ = ["Applied", "ChunkHitRow", "ChunkRow", "DocState", "Store", "content_hash"]

log = logging.getLogger("kfresh.indexer")

class Store:
    """SQLite-backed documents, chunks (with embeddings) and an append-only change log."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._w = self._connect()
        self._w.executescript(SCHEMA)
        self.cleanup_stale()

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a returned Ack is on disk.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _r(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("store is closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        self._closed = True
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._w.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection; COMMIT (fsynced) on success, else ROLLBACK."""
        with self._write_lock:
            self._w.execute("BEGIN IMMEDIATE")
            try:
                yield self._w
            except BaseException:
                if self._w.in_transaction:
                    self._w.execute("ROLLBACK")
                raise
            if self._w.in_transaction:
                try:
                    self._w.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (SQLITE_FULL, I/O error) leaves the transaction open: without this
                    # ROLLBACK every later write fails and a later COMMIT could persist an unacknowledged row.
                    if self._w.in_transaction:
                        self._w.execute("ROLLBACK")
                    raise

    # -- writes from clients -----------------------------------------------------------------------
    def upsert(self, doc: DocumentIn, chunks: Sequence[str], *, now: float | None = None) -> Ack:
        """Store a new version of `doc` with its chunks, or nothing when the content is unchanged."""
        digest = content_hash(doc)
        with self._txn() as w:
            cur = w.execute(
                "SELECT version, deleted, content_hash, acked_at FROM documents WHERE doc_id=?", (doc.id,)
            ).fetchone()
            if cur is not None and not cur[1] and cur[2] == digest:
                w.execute("ROLLBACK")
                return self._unchanged_ack(doc.id, cur[0], cur[3])
            version = 1 if cur is None else cur[0] + 1
            acked_at = time.time() if now is None else now
            valid_from = acked_at if doc.valid_from is None else float(doc.valid_from)
            meta = json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True)
            sup = json.dumps(list(doc.supersedes), ensure_ascii=False)
            w.execute(
                "INSERT INTO documents(doc_id, version, valid_from, source, metadata, supersedes, text,"
                " content_hash, deleted, acked_at, indexed_at, lag_ms) VALUES(?,?,?,?,?,?,?,?,0,?,NULL,NULL)"
                " ON CONFLICT(doc_id) DO UPDATE SET version=excluded.version, valid_from=excluded.valid_from,"
                " source=excluded.source, metadata=excluded.metadata, supersedes=excluded.supersedes,"
                " text=excluded.text, content_hash=excluded.content_hash, deleted=0,"
                " acked_at=excluded.acked_at, indexed_at=NULL, lag_ms=NULL",
                (doc.id, version, valid_from, doc.source, meta, sup, doc.text, digest, acked_at),
            )
            w.execute(
                "INSERT INTO versions(doc_id, version, valid_from, source, metadata, supersedes) VALUES(?,?,?,?,?,?)",
                (doc.id, version, valid_from, doc.source, meta, sup),
            )
            w.executemany(
                "INSERT INTO chunks(doc_id, version, ordinal, text, embedding) VALUES(?,?,?,?,NULL)",
                [(doc.id, version, i, text) for i, text in enumerate(chunks)],
            )
            seq = w.execute(
                "INSERT INTO changes(doc_id, version, op, at) VALUES(?,?,'upsert',?)", (doc.id, version, acked_at)
            ).lastrowid
        return Ack(id=doc.id, version=version, status="stored", chunks=len(chunks), seq=_rowid(seq), acked_at=acked_at)

    def _unchanged_ack(self, doc_id: str, version: int, acked_at: float) -> Ack:
        r = self._r()
        (n,) = r.execute("SELECT COUNT(*) FROM chunks WHERE doc_id=? AND version=?", (doc_id, version)).fetchone()
        (seq,) = r.execute("SELECT COALESCE(MAX(seq), 0) FROM changes WHERE doc_id=?", (doc_id,)).fetchone()
        return Ack(id=doc_id, version=version, status="unchanged", chunks=n, seq=seq, acked_at=acked_at)

    def delete(self, doc_id: str, *, now: float | None = None) -> Ack:
        """Mark `doc_id` deleted under a new version; chunk rows stay until the worker drops them from the index."""
        with self._txn() as w:
            cur = w.execute("SELECT version, deleted FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
            if cur is None or cur[1]:
                w.execute("ROLLBACK")
                version = 0 if cur is None else cur[0]
                return Ack(id=doc_id, version=version, status="not_found", chunks=0, seq=0, acked_at=time.time())
            version = cur[0] + 1
            acked_at = time.time() if now is None else now
            w.execute(
                "UPDATE documents SET version=?, deleted=1, acked_at=?, indexed_at=NULL, lag_ms=NULL WHERE doc_id=?",
                (version, acked_at, doc_id),
            )
            seq = w.execute(
                "INSERT INTO changes(doc_id, version, op, at) VALUES(?,?,'delete',?)", (doc_id, version, acked_at)
            ).lastrowid
        return Ack(id=doc_id, version=version, status="deleted", chunks=0, seq=_rowid(seq), acked_at=acked_at)

    def record_citations(self, pairs: Sequence[tuple[str, int]], *, now: float | None = None) -> int:
        """Append one (doc_id, version) row per passage an answer showed the model."""
        if not pairs:
            return 0
        at = time.time() if now is None else now
        with self._txn() as w:
            w.executemany("INSERT INTO citations(doc_id, version, at) VALUES(?,?,?)", [(d, int(v), at) for d, v in pairs])
        return len(pairs)

    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        """How often each (doc_id, version) was shown to the model since `since` (unix seconds)."""
        rows = self._r().execute(
            "SELECT doc_id, version, COUNT(*) FROM citations WHERE at>=? GROUP BY doc_id, version", (since,)
        ).fetchall()
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    # -- the worker's side -------------------------------------------------------------------------
    def current(self, doc_id: str) -> DocState | None:
        row = self._r().execute(
            "SELECT d.version, d.deleted, d.acked_at, d.indexed_at,"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes c WHERE c.doc_id=d.doc_id)"
            " FROM documents d WHERE d.doc_id=?",
            (doc_id,),
        ).fetchone()
        if row is None:
            return None
        return DocState(doc_id, row[0], bool(row[1]), row[2], row[3], row[4])

    def chunks_for(self, doc_id: str, version: int) -> list[ChunkRow]:
        rows = self._r().execute(
            "SELECT chunk_id, ordinal, text, embedding FROM chunks WHERE doc_id=? AND version=? ORDER BY ordinal",
            (doc_id, version),
        ).fetchall()
        return [ChunkRow(r[0], r[1], r[2], vec_from_blob(r[3])) for r in rows]

    def save_applied(self, applied: Sequence[Applied]) -> None:
        """Persist a micro-batch the worker made searchable: embeddings, indexed_at/lag, stale rows gone."""
        if not applied:
            return
        with self._txn() as w:
            for a in applied:
                if a.chunk_ids is not None and a.vectors is not None:
                    w.executemany(
                        "UPDATE chunks SET embedding=? WHERE chunk_id=? AND embedding IS NULL",
                        [(np.ascontiguousarray(v, dtype=np.float32).tobytes(), int(c))
                         for c, v in zip(a.chunk_ids, a.vectors)],
                    )
                w.execute(
                    "UPDATE documents SET indexed_at=?, lag_ms=? WHERE doc_id=? AND version=?",
                    (a.indexed_at, a.lag_ms, a.doc_id, a.version),
                )
                w.execute("DELETE FROM chunks WHERE doc_id=? AND version<?", (a.doc_id, a.version))
                w.execute("DELETE FROM versions WHERE doc_id=? AND version<?", (a.doc_id, a.version))

    def cleanup_stale(self) -> int:
        """Drop chunk rows of superseded or deleted versions (left behind by a crash before the worker's swap)."""
        with self._txn() as w:
            n = w.execute(
                "DELETE FROM chunks WHERE chunk_id IN (SELECT c.chunk_id FROM chunks c JOIN documents d"
                " ON d.doc_id=c.doc_id WHERE c.version<d.version OR d.deleted=1)"
            ).rowcount
            w.execute(
                "DELETE FROM versions WHERE rowid IN (SELECT v.rowid FROM versions v JOIN documents d"
                " ON d.doc_id=v.doc_id WHERE v.version<d.version OR d.deleted=1)"
            )
        if n:
            log.info("store.cleanup stale_chunks=%d", n)
        return n

    # -- reads for search and recovery -------------------------------------------------------------
    def lookup(self, chunk_ids: Sequence[int], *, with_vectors: bool = False) -> dict[int, ChunkHitRow]:
        """Resolve index ids to chunk rows with their version's attributes; unknown ids are absent."""
        ids = [int(i) for i in chunk_ids]
        if not ids:
            return {}
        emb = "c.embedding" if with_vectors else "NULL"
        out: dict[int, ChunkHitRow] = {}
        r = self._r()
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = r.execute(
                f"SELECT c.chunk_id, c.doc_id, c.version, c.ordinal, c.text, v.source, v.valid_from, v.metadata,"
                f" v.supersedes, d.deleted, {emb} FROM chunks c"
                " JOIN versions v ON v.doc_id=c.doc_id AND v.version=c.version"
                " JOIN documents d ON d.doc_id=c.doc_id"
                f" WHERE c.chunk_id IN ({','.join('?' * len(part))})",
                part,
            ).fetchall()
            for row in rows:
                out[row[0]] = ChunkHitRow(
                    chunk_id=row[0], doc_id=row[1], version=row[2], ordinal=row[3], text=row[4], source=row[5],
                    valid_from=row[6], metadata=json.loads(row[7]), supersedes=tuple(json.loads(row[8])),
                    doc_deleted=bool(row[9]), embedding=vec_from_blob(row[10]),
                )
        return out

    def iter_embedded(self, *, batch: int = 8192) -> Iterator[tuple[list[str], list[int], np.ndarray, np.ndarray]]:
        """Yield (doc_ids, versions, chunk_ids, vectors) of every live, embedded current-version chunk."""
        cur = self._r().execute(
            "SELECT c.doc_id, c.version, c.chunk_id, c.embedding FROM chunks c JOIN documents d"
            " ON d.doc_id=c.doc_id AND d.version=c.version AND d.deleted=0"
            " WHERE c.embedding IS NOT NULL ORDER BY c.chunk_id"
        )
        while rows := cur.fetchmany(batch):
            yield (
                [r[0] for r in rows],
                [r[1] for r in rows],
                np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows)),
                np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows]),
            )

    def docs_changed_since(self, seq: int) -> list[str]:
        rows = self._r().execute(
            "SELECT doc_id FROM changes WHERE seq>? GROUP BY doc_id ORDER BY MAX(seq)", (seq,)
        ).fetchall()
        return [r[0] for r in rows]

    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        return self._r().execute(
            "SELECT seq, doc_id, version, op FROM changes WHERE seq>? ORDER BY seq", (seq,)
        ).fetchall()

    def unembedded(self) -> list[tuple[DocState, int]]:
        """Live documents whose current version still lacks embeddings, with their chunk counts."""
        rows = self._r().execute(
            "SELECT d.doc_id, d.version, d.acked_at, d.indexed_at, COUNT(c.chunk_id),"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes x WHERE x.doc_id=d.doc_id)"
            " FROM documents d JOIN chunks c ON c.doc_id=d.doc_id AND c.version=d.version"
            " WHERE d.deleted=0 AND c.embedding IS NULL GROUP BY d.doc_id ORDER BY 6"
        ).fetchall()
        return [(DocState(r[0], r[1], False, r[2], r[3], r[5]), r[4]) for r in rows]

    def max_seq(self) -> int:
        (seq,) = self._r().execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(seq)

    def counts(self) -> tuple[int, int, int]:
        """(live documents, chunks of their current versions, deleted documents)."""
        r = self._r()
        live, deleted = r.execute(
            "SELECT COALESCE(SUM(deleted=0), 0), COALESCE(SUM(deleted=1), 0) FROM documents"
        ).fetchone()
        (chunks,) = r.execute(
            "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.doc_id=c.doc_id AND d.version=c.version"
            " AND d.deleted=0"
        ).fetchone()
        return int(live), int(chunks), int(deleted)

    # -- which embedder produced the stored vectors ------------------------------------------------
    def ensure_embedder(self, name: str, dim: int) -> bool:
        """Record the embedder; if a different one made the stored vectors, forget them. True if forgotten."""
        ident = f"{name}|{dim}"
        with self._txn() as w:
            row = w.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
            reset = row is not None and row[0] != ident
            if reset:
                w.execute("UPDATE chunks SET embedding=NULL")
                w.execute("UPDATE documents SET indexed_at=NULL, lag_ms=NULL")
            w.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('embedder', ?)", (ident,))
        if reset:
            log.warning("store.embedder_changed was=%s now=%s: stored vectors dropped, re-embedding", row[0], ident)
        return reset


def _rowid(value: int | None) -> int:
    assert value is not None, "INSERT did not produce a row id"
    return int(value)
