"""PostgreSQL document store (psycopg 3): the SQLite store's semantics, shareable by several kfresh replicas.

Durable ack: COMMIT returns after the WAL is flushed (synchronous_commit=on, set on the writer connection).
Several writers: each write transaction takes one advisory lock first (pg_advisory_xact_lock), so versions
never race and seq order equals commit order: a follower that read changes_since(s) never later finds a
smaller seq. One serialised writer connection per process (pg_writes.py holds its transactions), a pool of
read-only connections for searches from many threads, and a LISTEN connection for wait_for_change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from kfresh.indexer.rows import ChunkHitRow, embedded_batch, hit_from_row
from kfresh.indexer.stores import pg_writes
from kfresh.indexer.stores.base import StoreError, translate_errors
from kfresh.indexer.stores.pg_listen import ChangeListener
from kfresh.indexer.stores.pg_schema import CHANNEL, SCHEMA, WRITE_LOCK_KEY
from kfresh.indexer.stores.sql import SqlStore

try:  # this module is imported only for store.kind = "postgres" (stores/factory.py)
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "store.kind = 'postgres' needs psycopg 3 and psycopg-pool: .venv/bin/pip install -r requirements.txt "
        "(or pip install 'psycopg[binary]' psycopg-pool)"
    ) from exc

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


class PostgresStore(SqlStore, errors=_errors):
    """Documents, chunks (embeddings as BYTEA float32), the change log and citations in one PostgreSQL database.

    The methods both SQL backends share are in sql.py; here: connections, transactions, and PostgreSQL's SQL.
    """

    _p: ClassVar[str] = "%s"
    _writes: ClassVar[ModuleType] = pg_writes

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
                row = probe.execute("SELECT to_regclass('changes') IS NOT NULL").fetchone()
                if row is None or not row[0]:
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

    # -- reads in PostgreSQL's own way (every other read and write: sql.py) ------------------------
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
