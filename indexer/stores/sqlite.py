"""SQLite document store: WAL mode with synchronous=FULL, so an Ack survives SIGKILL and power loss.

The store is the source of truth; the vector index is a cache of it that can always be rebuilt from the
embeddings kept here. One writer connection (serialised by a lock) and one reader connection per thread.
Opened `read_only` (the finetuner), every connection is SQLite's mode=ro and nothing is created or cleaned.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np

from kfresh.indexer.documents import Ack, WriteOp
from kfresh.indexer.rows import (
    SCHEMA, Applied, ChunkHitRow, ChunkRow, DocRecord, DocState, doc_record, embedded_batch, hit_from_row, vec_from_blob,
)  # fmt: skip
from kfresh.indexer.stores import sqlite_writes
from kfresh.indexer.stores.base import DocumentStore, StoreError, translate_errors

log = logging.getLogger("kfresh.indexer")

_POLL_S = 0.02  # wait_for_change: how often max_seq is re-read (another process may be the writer)


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)  # raised by hand (fault injection) without a code


_errors = translate_errors(sqlite3.Error, _is_full)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (SQLite's mode=ro), with a busy timeout for the server's WAL commits."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"document store {path} does not exist; ingest documents first")
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"  # quoted: a path may hold '?', '#' or spaces
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SqliteStore(DocumentStore):
    """SQLite-backed documents, chunks (with embeddings) and an append-only change log."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._w: sqlite3.Connection | None = None
        if read_only:
            connect_read_only(self.path).close()  # FileNotFoundError now, not at the first read
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._w = _errors(self._connect)()
        _errors(self._w.executescript)(SCHEMA)
        self.cleanup_stale()

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return connect_read_only(self.path)
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
            if self._w is not None:
                self._w.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection; COMMIT (fsynced) on success, else ROLLBACK."""
        if self._w is None:
            raise StoreError(f"document store {self.path} is open read-only")
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

    # -- writes (their SQL: sqlite_writes.py) ------------------------------------------------------
    @_errors
    def write_many(self, ops: Sequence[WriteOp], *, now: float | None = None) -> list[Ack]:
        if not ops:
            return []
        with self._txn() as w:
            return [sqlite_writes.upsert(w, op.doc, op.chunks, now) if op.doc is not None else sqlite_writes.delete(w, op.doc_id, now)
                    for op in ops]  # fmt: skip

    @_errors
    def record_citations(self, pairs: Sequence[tuple[str, int]], *, now: float | None = None) -> int:
        if not pairs:
            return 0
        at = time.time() if now is None else now
        with self._txn() as w:
            w.executemany("INSERT INTO citations(doc_id, version, at) VALUES(?,?,?)", [(d, int(v), at) for d, v in pairs])
        return len(pairs)

    @_errors
    def save_applied(self, applied: Sequence[Applied]) -> None:
        if applied:
            with self._txn() as w:
                sqlite_writes.save_applied(w, applied)

    @_errors
    def cleanup_stale(self) -> int:
        with self._txn() as w:
            n = sqlite_writes.cleanup_stale(w)
        if n:
            log.info("store.cleanup stale_chunks=%d", n)
        return n

    @_errors
    def ensure_embedder(self, name: str, dim: int) -> bool:
        ident = f"{name}|{dim}"
        with self._txn() as w:
            was = sqlite_writes.ensure_embedder(w, ident)
        if was is not None:
            log.warning("store.embedder_changed was=%s now=%s: stored vectors dropped, re-embedding", was, ident)
        return was is not None

    # -- reads -------------------------------------------------------------------------------------
    @_errors
    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        rows = self._r().execute(
            "SELECT doc_id, version, COUNT(*) FROM citations WHERE at>=? GROUP BY doc_id, version", (since,)
        ).fetchall()
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    @_errors
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

    @_errors
    def chunks_for(self, doc_id: str, version: int) -> list[ChunkRow]:
        rows = self._r().execute(
            "SELECT chunk_id, ordinal, text, embedding FROM chunks WHERE doc_id=? AND version=? ORDER BY ordinal",
            (doc_id, version),
        ).fetchall()
        return [ChunkRow(r[0], r[1], r[2], vec_from_blob(r[3])) for r in rows]

    @_errors
    def lookup(self, chunk_ids: Sequence[int], *, with_vectors: bool = False) -> dict[int, ChunkHitRow]:
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
            out.update((row[0], hit_from_row(row)) for row in rows)
        return out

    @_errors
    def iter_embedded(self, *, batch: int = 8192) -> Iterator[tuple[list[str], list[int], np.ndarray, np.ndarray]]:
        cur = self._r().execute(
            "SELECT c.doc_id, c.version, c.chunk_id, c.embedding FROM chunks c JOIN documents d"
            " ON d.doc_id=c.doc_id AND d.version=c.version AND d.deleted=0"
            " WHERE c.embedding IS NOT NULL ORDER BY c.chunk_id"
        )
        while rows := cur.fetchmany(batch):
            yield embedded_batch(rows)

    @_errors
    def docs_changed_since(self, seq: int) -> list[str]:
        rows = self._r().execute(
            "SELECT doc_id FROM changes WHERE seq>? GROUP BY doc_id ORDER BY MAX(seq)", (seq,)
        ).fetchall()
        return [r[0] for r in rows]

    @_errors
    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        return self._r().execute(
            "SELECT seq, doc_id, version, op FROM changes WHERE seq>? ORDER BY seq", (seq,)
        ).fetchall()

    @_errors
    def unembedded(self) -> list[tuple[DocState, int]]:
        rows = self._r().execute(
            "SELECT d.doc_id, d.version, d.acked_at, d.indexed_at, COUNT(c.chunk_id),"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes x WHERE x.doc_id=d.doc_id)"
            " FROM documents d JOIN chunks c ON c.doc_id=d.doc_id AND c.version=d.version"
            " WHERE d.deleted=0 AND c.embedding IS NULL GROUP BY d.doc_id ORDER BY 6"
        ).fetchall()
        return [(DocState(r[0], r[1], False, r[2], r[3], r[5]), r[4]) for r in rows]

    @_errors
    def max_seq(self) -> int:
        (seq,) = self._r().execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        return int(seq)

    def wait_for_change(self, after_seq: int, timeout_s: float) -> bool:
        """Polls max_seq every 20 ms: the writer may be another process, which SQLite cannot signal."""
        deadline = time.monotonic() + timeout_s
        while self.max_seq() <= after_seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL_S, left))
        return True

    @_errors
    def counts(self) -> tuple[int, int, int]:
        r = self._r()
        live, deleted = r.execute(
            "SELECT COALESCE(SUM(deleted=0), 0), COALESCE(SUM(deleted=1), 0) FROM documents"
        ).fetchone()
        (chunks,) = r.execute(
            "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.doc_id=c.doc_id AND d.version=c.version"
            " AND d.deleted=0"
        ).fetchone()
        return int(live), int(chunks), int(deleted)

    # -- the finetuner's read-only view ------------------------------------------------------------
    @_errors
    def documents(self) -> list[DocRecord]:
        rows = self._r().execute(
            "SELECT doc_id, version, source, valid_from, acked_at, supersedes, text, deleted FROM documents"
            " ORDER BY valid_from, doc_id"
        ).fetchall()
        return [doc_record(r) for r in rows]

    @_errors
    def cited_versions(self) -> set[tuple[str, int]]:
        """A store written before citations were recorded has no such table: nothing was cited."""
        try:
            rows = self._r().execute("SELECT DISTINCT doc_id, version FROM citations").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return set()
        return {(r[0], int(r[1])) for r in rows}
