"""SQLite document store: WAL mode with synchronous=FULL, so an Ack survives SIGKILL and power loss.

The store is the source of truth; the vector index is a cache of it that can always be rebuilt from the
embeddings kept here. One writer connection (serialised by a lock) and one reader connection per thread.
Opened `read_only` (the finetuner), every connection is SQLite's mode=ro and nothing is created or cleaned.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np

from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.rows import ChunkHitRow, Erased, content_hash, embedded_batch, hit_from_row
from kfresh.indexer.stores import sqlite_writes
from kfresh.indexer.stores.base import StoreError, translate_errors
from kfresh.indexer.stores.sql import SqlStore
from kfresh.indexer.stores.sqlite_schema import SCHEMA

log = logging.getLogger("kfresh.indexer")

_POLL_S = 0.02  # wait_for_change: how often max_seq is re-read (another process may be the writer)


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)  # raised by hand (fault injection) without a code


_errors = translate_errors(sqlite3.Error, _is_full)


def _bulk_insert(
    w: sqlite3.Connection, part: Sequence[tuple[DocumentIn, Sequence[str], np.ndarray]], at: float
) -> None:
    """One batch of bulk_load: its documents, then their versions, history, chunks and changes (seq in the batch's order)."""
    docs, versions, chunks = [], [], []
    for doc, texts, vectors in part:
        if len(texts) != len(vectors):
            raise ValueError(f"bulk_load: document {doc.id!r} has {len(texts)} chunks but {len(vectors)} vectors")
        valid_from = at if doc.valid_from is None else float(doc.valid_from)
        # What sqlite_writes.upsert stores; the JSON of empty ones ("{}", "[]") without a json.dumps per document.
        meta = json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True) if doc.metadata else "{}"
        sup = json.dumps(list(doc.supersedes), ensure_ascii=False) if doc.supersedes else "[]"
        docs.append((doc.id, valid_from, doc.source, meta, sup, doc.text, content_hash(doc), at, at))
        versions.append((doc.id, valid_from, doc.source, meta, sup))
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)  # each row's bytes: vec_to_blob's, one call a document
        chunks += [(doc.id, i, text, vecs[i].tobytes()) for i, text in enumerate(texts)]
    w.executemany(
        "INSERT INTO documents(doc_id, version, valid_from, source, metadata, supersedes, text, content_hash,"
        " deleted, acked_at, indexed_at, lag_ms) VALUES(?,1,?,?,?,?,?,?,0,?,?,0)",
        docs,
    )
    w.executemany(
        "INSERT INTO versions(doc_id, version, valid_from, source, metadata, supersedes) VALUES(?,1,?,?,?,?)", versions
    )
    w.executemany(
        "INSERT INTO history(doc_id, version, valid_from, source, metadata, supersedes, acked_at) VALUES(?,1,?,?,?,?,?)",
        [(*v, at) for v in versions],
    )
    w.executemany("INSERT INTO chunks(doc_id, version, ordinal, text, embedding) VALUES(?,1,?,?,?)", chunks)
    w.executemany("INSERT INTO changes(doc_id, version, op, at) VALUES(?,1,'upsert',?)", [(d[0], at) for d in docs])


@contextmanager
def _table_may_be_missing() -> Iterator[None]:
    """Swallow "no such table": a read-only view of a store written before that table existed (the caller then
    returns its empty answer); any other error passes."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (SQLite's mode=ro), with a busy timeout for the server's WAL commits."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"document store {path} does not exist; ingest documents first")
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"  # quoted: a path may hold '?', '#' or spaces
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SqliteStore(SqlStore, errors=_errors):
    """SQLite-backed documents, chunks (with embeddings) and an append-only change log.

    The methods both SQL backends share are in sql.py; here: connections, transactions, and SQLite's SQL.
    """

    _p: ClassVar[str] = "?"
    _writes: ClassVar[ModuleType] = sqlite_writes

    def __init__(self, path: Path | str, *, read_only: bool = False, secure_delete: bool = True) -> None:
        """`secure_delete`: deleted rows' bytes are overwritten with zeros (store.secure_delete)."""
        self.path = Path(path)
        self.read_only = read_only
        self.secure_delete = secure_delete
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
        # Deleted rows' bytes are overwritten with zeros, so an older version's text or a purged document
        # does not linger in free pages (`erase` then truncates the WAL, which holds the old page images).
        conn.execute(f"PRAGMA secure_delete={'ON' if self.secure_delete else 'OFF'}")
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

    def _fetchall(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._r().execute(query, params).fetchall()

    @contextmanager
    def _txn(self, *, serialised: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection; COMMIT (fsynced) on success, else ROLLBACK.
        Every one is serialised (`serialised` is moot): BEGIN IMMEDIATE takes SQLite's single write lock."""
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

    # -- building a store in bulk ------------------------------------------------------------------
    @_errors
    def bulk_load(self, docs: Iterable[tuple[DocumentIn, Sequence[str], np.ndarray]], *, now: float | None = None,
                  batch: int = 20_000, durable: bool = True) -> int:  # fmt: skip
        """Store documents that are not in the store yet, already embedded; returns how many.

        Each (doc, its chunks, one vector per chunk) leaves the rows upsert and then the worker's save_applied
        would: version 1 acked and indexed at `now` (lag 0), chunks with their embeddings, one change-log
        entry. `batch` documents per transaction; an id already stored fails its batch (earlier ones stay).
        `durable` False, for building a new file (benchmarks/preload.py): no fsync while loading, for every
        writer of this store (synchronous=OFF), then one synced checkpoint, so the rows are durable once this
        returns; a power loss before that may lose or corrupt the file.
        """
        if self._w is None:
            raise StoreError(f"document store {self.path} is open read-only")
        at = time.time() if now is None else now
        todo, loaded = iter(docs), 0
        if not durable:
            with self._write_lock:
                self._w.execute("PRAGMA synchronous=OFF")
        try:
            while part := list(itertools.islice(todo, batch)):
                with self._txn() as w:
                    _bulk_insert(w, part, at)
                loaded += len(part)
        finally:
            if not durable:
                with self._write_lock:
                    self._w.execute("PRAGMA synchronous=FULL")
                    self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return loaded

    # -- reads in SQLite's own way (every other read and write: sql.py) ----------------------------
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
    def erase(self, doc_id: str) -> Erased | None:
        """As the shared erase, then the WAL is checkpointed and truncated: the erased rows' old page images
        leave it (with secure_delete the database file's freed space is zeros already)."""
        erased = super().erase(doc_id)
        if erased is not None and self._w is not None:
            for _ in range(50):  # a reader mid-statement makes the checkpoint busy; they are short
                with self._write_lock:
                    busy = self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if not busy:
                    break
                time.sleep(0.02)
            else:
                log.warning(
                    "store.erase_checkpoint_busy doc_id=%s: the WAL keeps old pages until the next checkpoint", doc_id
                )
        return erased

    # -- the finetuner's read-only view ------------------------------------------------------------
    @_errors
    def logged_questions(self, versions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], list[str]]:
        """A store written before answers were logged has no such table: no questions."""
        with _table_may_be_missing():
            return super().logged_questions(versions)
        return {}

    @_errors
    def cited_versions(self) -> set[tuple[str, int]]:
        """A store written before citations were recorded has no such table: nothing was cited."""
        with _table_may_be_missing():
            return super().cited_versions()
        return set()
