"""PostgreSQL document store (psycopg 3): the SQLite store's semantics, shareable by several kfresh replicas.

Durable ack: COMMIT returns after the WAL is flushed (synchronous_commit=on, set on the writer connection).
Several writers: each write transaction takes one advisory lock first (pg_advisory_xact_lock), so versions
never race and seq order equals commit order: a follower that read changes_since(s) never later finds a
smaller seq. One serialised writer connection per process (pg_writes.py holds its transactions), a pool of
read-only connections for searches from many threads, and a LISTEN connection for wait_for_change.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kfresh.indexer.documents import Ack, WriteOp
from kfresh.indexer.rows import (
    Applied, ChunkHitRow, ChunkRow, DocRecord, DocState, doc_record, embedded_batch, hit_from_row, vec_from_blob,
)  # fmt: skip
from kfresh.indexer.stores import pg_writes
from kfresh.indexer.stores.base import DocumentStore, StoreError, translate_errors
from kfresh.indexer.stores.pg_listen import ChangeListener
from kfresh.indexer.stores.pg_schema import CHANNEL, SCHEMA, WRITE_LOCK_KEY

try:  # this module is imported only for store.kind = "postgres" (stores/factory.py)
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "store.kind = 'postgres' needs psycopg 3 and psycopg-pool: .venv/bin/pip install -r requirements.txt "
        "(or pip install 'psycopg[binary]' psycopg-pool)"
    ) from exc

log = logging.getLogger("kfresh.indexer")

_WRITER_CHECK_IDLE_S = 1.0

_RECHECK_S = 0.5  # wait_for_change re-reads max_seq at least this often (covers a listener that is down)
_errors = translate_errors(psycopg.Error, lambda exc: getattr(exc, "sqlstate", None) == "53100")  # disk_full


def conninfo(dsn: str) -> str:
    """`dsn` (a libpq string or postgresql:// URL) with a connect timeout and an application name by default."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:  # libpq's message may quote the DSN, password included
        raise StoreError("store.dsn is not a valid libpq connection string or postgresql:// URL") from None
    params.setdefault("connect_timeout", 10)
    params.setdefault("application_name", "kfresh")
    return make_conninfo("", **params)


def describe(dsn: str) -> str:
    """host/port/dbname of `dsn` for messages; never the password."""
    params = conninfo_to_dict(conninfo(dsn))
    return " ".join(f"{k}={params[k]}" for k in ("host", "port", "dbname") if params.get(k)) or "(libpq defaults)"


@_errors
def schema_exists(dsn: str) -> bool:
    """True once a writer has created the store's tables in this database."""
    with psycopg.connect(conninfo(dsn), autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('changes') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _read_only_session(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET default_transaction_read_only = on")  # pooled connections only ever read


class PostgresStore(DocumentStore):
    """Documents, chunks (embeddings as BYTEA float32), the change log and citations in one PostgreSQL database."""

    def __init__(self, dsn: str, *, read_only: bool = False, pool_size: int = 8, open_timeout_s: float = 15.0) -> None:
        self._dsn = conninfo(dsn)
        self.where = describe(dsn)
        self.read_only = read_only
        self._closed = False
        self._write_lock = threading.Lock()
        self._listener: ChangeListener | None = None
        self._listener_lock = threading.Lock()
        self._w: psycopg.Connection[Any] | None = None
        self._w_used = 0.0  # time.monotonic() of the writer's last transaction
        self._pool = ConnectionPool(
            self._dsn, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, configure=_read_only_session,
            open=False, name="kfresh-store", num_workers=2,
            # Checked on borrow (one empty round trip): after a server restart or a failover a search gets a
            # fresh connection instead of the dead one's error.
            check=ConnectionPool.check_connection,
        )  # fmt: skip
        try:
            self._open(open_timeout_s)
        except BaseException as exc:
            self.close()
            if isinstance(exc, psycopg.Error):
                raise StoreError(f"cannot open the document store at {self.where}: {exc}") from exc
            raise

    def _open(self, timeout_s: float) -> None:
        # One direct connection first: an unreachable server fails now with libpq's reason, not a pool timeout.
        if self.read_only:
            with self._connect() as probe:
                if not probe.execute("SELECT to_regclass('changes') IS NOT NULL").fetchone()[0]:
                    raise FileNotFoundError(f"document store {self.where} has no kfresh tables; ingest documents first")
        else:
            self._w = self._connect_writer()
        self._pool.open(wait=True, timeout=timeout_s)
        if not self.read_only:
            with self._txn() as cur:  # under the write lock: replicas starting together do not race on CREATE
                cur.execute(SCHEMA)
            self.cleanup_stale()

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._dsn, autocommit=True)

    def _connect_writer(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        # Explicit, whatever the server's default: COMMIT returns only once the WAL is flushed to disk.
        conn.execute("SET synchronous_commit = on")
        return conn

    def _fetchall(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._closed:
            raise StoreError("store is closed")
        with self._pool.connection() as conn:
            return conn.execute(query, params).fetchall()

    @contextmanager
    def _txn(self, *, serialised: bool = True) -> Iterator[psycopg.Cursor[Any]]:
        """One write transaction on the writer connection, first taking the cluster-wide write lock when
        `serialised`. COMMIT (durable) on success, ROLLBACK on error; a dropped connection is replaced."""
        if self._closed:
            raise StoreError("store is closed")
        if self.read_only:
            raise StoreError(f"document store {self.where} is open read-only")
        with self._write_lock:
            if not self._writer_alive():
                if self._w is not None:
                    self._w.close()
                self._w = self._connect_writer()
            assert self._w is not None
            self._w_used = time.monotonic()
            with self._w.transaction(), self._w.cursor() as cur:
                if serialised:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                yield cur

    def _writer_alive(self) -> bool:
        """False when the writer connection is gone. After an idle second it is checked with an empty query
        first, so the first write after a server restart or failover reconnects instead of failing."""
        w = self._w
        if w is None or w.broken or w.closed:
            return False
        if time.monotonic() - self._w_used < _WRITER_CHECK_IDLE_S:
            return True
        try:
            w.execute("")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        self._closed = True
        with self._listener_lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
        self._pool.close()
        with self._write_lock:
            if self._w is not None:
                self._w.close()

    # -- writes (their SQL: pg_writes.py) ----------------------------------------------------------
    @_errors
    def write_many(self, ops: Sequence[WriteOp], *, now: float | None = None) -> list[Ack]:
        if not ops:
            return []
        with self._txn() as cur:
            return [pg_writes.upsert(cur, op.doc, op.chunks, now) if op.doc is not None else pg_writes.delete(cur, op.doc_id, now)
                    for op in ops]  # fmt: skip

    @_errors
    def record_citations(self, pairs: Sequence[tuple[str, int]], *, now: float | None = None) -> int:
        if not pairs:
            return 0
        at = time.time() if now is None else now
        with self._txn(serialised=False) as cur:  # touches no document, version or change
            cur.executemany("INSERT INTO citations(doc_id, version, at) VALUES(%s,%s,%s)", [(d, int(v), at) for d, v in pairs])
        return len(pairs)

    @_errors
    def save_applied(self, applied: Sequence[Applied]) -> None:
        if applied:
            with self._txn() as cur:
                pg_writes.save_applied(cur, applied)

    @_errors
    def cleanup_stale(self) -> int:
        with self._txn() as cur:
            n = pg_writes.cleanup_stale(cur)
        if n:
            log.info("store.cleanup stale_chunks=%d", n)
        return n

    @_errors
    def ensure_embedder(self, name: str, dim: int) -> bool:
        ident = f"{name}|{dim}"
        with self._txn() as cur:
            was = pg_writes.ensure_embedder(cur, ident)
        if was is not None:
            log.warning("store.embedder_changed was=%s now=%s: stored vectors dropped, re-embedding", was, ident)
        return was is not None

    # -- reads -------------------------------------------------------------------------------------
    @_errors
    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        rows = self._fetchall("SELECT doc_id, version, COUNT(*) FROM citations WHERE at>=%s GROUP BY doc_id, version", (since,))
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    @_errors
    def current(self, doc_id: str) -> DocState | None:
        rows = self._fetchall(
            "SELECT d.version, d.deleted, d.acked_at, d.indexed_at,"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes c WHERE c.doc_id=d.doc_id) FROM documents d WHERE d.doc_id=%s",
            (doc_id,),
        )
        if not rows:
            return None
        version, deleted, acked_at, indexed_at, seq = rows[0]
        return DocState(doc_id, int(version), bool(deleted), acked_at, indexed_at, int(seq))

    @_errors
    def chunks_for(self, doc_id: str, version: int) -> list[ChunkRow]:
        rows = self._fetchall(
            "SELECT chunk_id, ordinal, text, embedding FROM chunks WHERE doc_id=%s AND version=%s ORDER BY ordinal",
            (doc_id, version),
        )
        return [ChunkRow(int(r[0]), int(r[1]), r[2], vec_from_blob(r[3])) for r in rows]

    @_errors
    def lookup(self, chunk_ids: Sequence[int], *, with_vectors: bool = False) -> dict[int, ChunkHitRow]:
        ids = [int(i) for i in chunk_ids]
        if not ids:
            return {}
        rows = self._fetchall(
            "SELECT c.chunk_id, c.doc_id, c.version, c.ordinal, c.text, v.source, v.valid_from, v.metadata,"
            f" v.supersedes, d.deleted, {'c.embedding' if with_vectors else 'NULL'} FROM chunks c"
            " JOIN versions v ON v.doc_id=c.doc_id AND v.version=c.version JOIN documents d ON d.doc_id=c.doc_id"
            " WHERE c.chunk_id = ANY(%s::bigint[])",
            (ids,),
        )
        return {int(row[0]): hit_from_row(row) for row in rows}

    @_errors
    def iter_embedded(self, *, batch: int = 8192) -> Iterator[tuple[list[str], list[int], np.ndarray, np.ndarray]]:
        if self._closed:
            raise StoreError("store is closed")
        # A server-side cursor: one consistent snapshot, streamed, never the whole corpus in memory.
        with self._pool.connection() as conn, conn.transaction(), conn.cursor(name="kfresh_embedded") as cur:
            cur.itersize = batch
            cur.execute(
                "SELECT c.doc_id, c.version, c.chunk_id, c.embedding FROM chunks c JOIN documents d"
                " ON d.doc_id=c.doc_id AND d.version=c.version AND NOT d.deleted"
                " WHERE c.embedding IS NOT NULL ORDER BY c.chunk_id"
            )
            while rows := cur.fetchmany(batch):
                yield embedded_batch(rows)

    @_errors
    def docs_changed_since(self, seq: int) -> list[str]:
        return [r[0] for r in self._fetchall("SELECT doc_id FROM changes WHERE seq>%s GROUP BY doc_id ORDER BY MAX(seq)", (seq,))]

    @_errors
    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        rows = self._fetchall("SELECT seq, doc_id, version, op FROM changes WHERE seq>%s ORDER BY seq", (seq,))
        return [(int(r[0]), r[1], int(r[2]), r[3]) for r in rows]

    @_errors
    def unembedded(self) -> list[tuple[DocState, int]]:
        rows = self._fetchall(
            "SELECT d.doc_id, d.version, d.acked_at, d.indexed_at, COUNT(c.chunk_id),"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes x WHERE x.doc_id=d.doc_id)"
            " FROM documents d JOIN chunks c ON c.doc_id=d.doc_id AND c.version=d.version"
            " WHERE NOT d.deleted AND c.embedding IS NULL GROUP BY d.doc_id ORDER BY 6"
        )
        return [(DocState(r[0], int(r[1]), False, r[2], r[3], int(r[5])), int(r[4])) for r in rows]

    @_errors
    def max_seq(self) -> int:
        return int(self._fetchall("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    @_errors
    def counts(self) -> tuple[int, int, int]:
        live, deleted, chunks = self._fetchall(
            "SELECT COUNT(*) FILTER (WHERE NOT deleted), COUNT(*) FILTER (WHERE deleted),"
            " (SELECT COUNT(*) FROM chunks c JOIN documents d ON d.doc_id=c.doc_id AND d.version=c.version"
            " AND NOT d.deleted) FROM documents"
        )[0]
        return int(live), int(chunks), int(deleted)

    @_errors
    def documents(self) -> list[DocRecord]:
        rows = self._fetchall(
            "SELECT doc_id, version, source, valid_from, acked_at, supersedes, text, deleted FROM documents"
            " ORDER BY valid_from, doc_id"
        )
        return [doc_record(r) for r in rows]

    @_errors
    def cited_versions(self) -> set[tuple[str, int]]:
        return {(r[0], int(r[1])) for r in self._fetchall("SELECT DISTINCT doc_id, version FROM citations")}

    # -- waiting for other writers -----------------------------------------------------------------
    def wait_for_change(self, after_seq: int, timeout_s: float) -> bool:
        """LISTEN/NOTIFY: wakes at the commit of any writer's change, in this process or another replica."""
        deadline = time.monotonic() + timeout_s
        listener = self._change_listener()
        listener.listening.wait(max(0.0, min(timeout_s, 5.0)))  # a commit before LISTEN is caught by max_seq
        generation = listener.generation  # taken BEFORE max_seq: a commit in between still wakes us
        while self.max_seq() <= after_seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            generation = listener.wait(generation, min(left, _RECHECK_S))
        return True

    def _change_listener(self) -> ChangeListener:
        with self._listener_lock:
            if self._closed:
                raise StoreError("store is closed")
            if self._listener is None:
                self._listener = ChangeListener(self._connect, CHANNEL, psycopg.Error)
            return self._listener
