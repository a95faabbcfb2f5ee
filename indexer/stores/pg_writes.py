"""The PostgreSQL store's write transactions, each run on the writer's cursor inside one transaction that
already holds the cluster-wide write lock (postgres.py `_txn`). Same rows and rules as the SQLite store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

from kfresh.indexer.documents import Ack, DocumentIn
from kfresh.indexer.rows import CHUNK_COLUMNS, Applied, content_hash, vec_to_blob
from kfresh.indexer.stores.pg_schema import CHANNEL

END_VERSION = "UPDATE history SET ended_at=%s, ended_by=%s WHERE doc_id=%s AND ended_at IS NULL"  # see sqlite_writes

Cursor = Any  # psycopg.Cursor; psycopg is imported only by postgres.py


def upsert(cur: Cursor, doc: DocumentIn, chunks: Sequence[str], now: float | None) -> Ack:
    """A new version of `doc` with its chunks and a change-log entry, or nothing when the content is unchanged."""
    digest = content_hash(doc)
    row = cur.execute(
        "SELECT version, deleted, content_hash, acked_at FROM documents WHERE doc_id=%s", (doc.id,)
    ).fetchone()
    if row is not None and not row[1] and row[2] == digest:
        return _unchanged_ack(cur, doc.id, int(row[0]), float(row[3]))
    version = 1 if row is None else int(row[0]) + 1
    acked_at = time.time() if now is None else now
    valid_from = acked_at if doc.valid_from is None else float(doc.valid_from)
    meta = json.dumps(doc.metadata, ensure_ascii=False, sort_keys=True)
    sup = json.dumps(list(doc.supersedes), ensure_ascii=False)
    cur.execute(
        "INSERT INTO documents(doc_id, version, valid_from, source, metadata, supersedes, text, content_hash,"
        " deleted, acked_at, indexed_at, lag_ms) VALUES(%s,%s,%s,%s,%s,%s,%s,%s,false,%s,NULL,NULL)"
        " ON CONFLICT(doc_id) DO UPDATE SET version=excluded.version, valid_from=excluded.valid_from,"
        " source=excluded.source, metadata=excluded.metadata, supersedes=excluded.supersedes,"
        " text=excluded.text, content_hash=excluded.content_hash, deleted=false,"
        " acked_at=excluded.acked_at, indexed_at=NULL, lag_ms=NULL",
        (doc.id, version, valid_from, doc.source, meta, sup, doc.text, digest, acked_at),
    )
    cur.execute(
        "INSERT INTO versions(doc_id, version, valid_from, source, metadata, supersedes) VALUES(%s,%s,%s,%s,%s,%s)",
        (doc.id, version, valid_from, doc.source, meta, sup),
    )
    cur.execute(END_VERSION, (acked_at, "upsert", doc.id))
    cur.execute(
        "INSERT INTO history(doc_id, version, valid_from, source, metadata, supersedes, acked_at)"
        " VALUES(%s,%s,%s,%s,%s,%s,%s)",
        (doc.id, version, valid_from, doc.source, meta, sup, acked_at),
    )
    cur.execute(  # every chunk in one statement; ordinals from the array order
        "INSERT INTO chunks(doc_id, version, ordinal, text)"
        " SELECT %s, %s, u.ord - 1, u.text FROM unnest(%s::text[]) WITH ORDINALITY AS u(text, ord)",
        (doc.id, version, list(chunks)),
    )
    seq = _append_change(cur, doc.id, version, "upsert", acked_at)
    return Ack(id=doc.id, version=version, status="stored", chunks=len(chunks), seq=seq, acked_at=acked_at)


def _unchanged_ack(cur: Cursor, doc_id: str, version: int, acked_at: float) -> Ack:
    n, seq = cur.execute(
        "SELECT (SELECT COUNT(*) FROM chunks WHERE doc_id=%s AND version=%s),"
        " (SELECT COALESCE(MAX(seq), 0) FROM changes WHERE doc_id=%s)",
        (doc_id, version, doc_id),
    ).fetchone()
    return Ack(id=doc_id, version=version, status="unchanged", chunks=int(n), seq=int(seq), acked_at=acked_at)


def delete(cur: Cursor, doc_id: str, now: float | None) -> Ack:
    """Mark `doc_id` deleted under a new version; its chunk rows stay until the worker drops them from the index."""
    row = cur.execute("SELECT version, deleted FROM documents WHERE doc_id=%s", (doc_id,)).fetchone()
    if row is None or row[1]:
        version = 0 if row is None else int(row[0])
        return Ack(id=doc_id, version=version, status="not_found", chunks=0, seq=0, acked_at=time.time())
    version = int(row[0]) + 1
    acked_at = time.time() if now is None else now
    cur.execute(
        "UPDATE documents SET version=%s, deleted=true, acked_at=%s, indexed_at=NULL, lag_ms=NULL WHERE doc_id=%s",
        (version, acked_at, doc_id),
    )
    cur.execute(END_VERSION, (acked_at, "delete", doc_id))
    seq = _append_change(cur, doc_id, version, "delete", acked_at)
    return Ack(id=doc_id, version=version, status="deleted", chunks=0, seq=seq, acked_at=acked_at)


def _append_change(cur: Cursor, doc_id: str, version: int, op: Literal["upsert", "delete"], at: float) -> int:
    """Append to the change log and NOTIFY listeners (delivered only if and when the transaction commits)."""
    row = cur.execute(
        "WITH c AS (INSERT INTO changes(doc_id, version, op, at) VALUES(%s,%s,%s,%s) RETURNING seq)"
        " SELECT seq, pg_notify(%s, seq::text) FROM c",
        (doc_id, version, op, at, CHANNEL),
    ).fetchone()
    return int(row[0])


def save_applied(cur: Cursor, applied: Sequence[Applied]) -> None:
    """Embeddings of what the worker made searchable, its indexed_at/lag, and the older versions' rows gone."""
    for a in applied:
        if a.chunk_ids is not None and a.vectors is not None:
            cur.executemany(
                "UPDATE chunks SET embedding=%s WHERE chunk_id=%s AND embedding IS NULL",
                [(vec_to_blob(v), int(c)) for c, v in zip(a.chunk_ids, a.vectors)],
            )
        cur.execute(
            "UPDATE documents SET indexed_at=%s, lag_ms=%s WHERE doc_id=%s AND version=%s",
            (a.indexed_at, a.lag_ms, a.doc_id, a.version),
        )
        cur.execute(
            f"INSERT INTO history_chunks SELECT {CHUNK_COLUMNS} FROM chunks WHERE doc_id=%s AND version<%s"
            " ON CONFLICT DO NOTHING",
            (a.doc_id, a.version),
        )
        cur.execute("DELETE FROM chunks WHERE doc_id=%s AND version<%s", (a.doc_id, a.version))
        cur.execute("DELETE FROM versions WHERE doc_id=%s AND version<%s", (a.doc_id, a.version))


def backfill_history(cur: Cursor) -> int:
    """A store written before history was kept: each live document's current version becomes its first history
    row (acknowledged at its ack time, nothing ended), once, when the history is empty. Returns the rows added."""
    if cur.execute("SELECT 1 FROM history LIMIT 1").fetchone() is not None:
        return 0
    return int(
        cur.execute(
            "INSERT INTO history(doc_id, version, valid_from, source, metadata, supersedes, acked_at)"
            " SELECT d.doc_id, d.version, d.valid_from, d.source, d.metadata, d.supersedes, d.acked_at FROM documents d"
            " WHERE NOT d.deleted"
        ).rowcount
        or 0
    )


def cleanup_stale(cur: Cursor) -> int:
    """Drop chunk and version rows of superseded or deleted versions (their chunks kept in history_chunks);
    returns the chunks dropped."""
    cur.execute(
        f"INSERT INTO history_chunks SELECT {', '.join('c.' + c for c in CHUNK_COLUMNS.split(', '))} FROM chunks c"
        " JOIN documents d ON d.doc_id=c.doc_id WHERE c.version<d.version OR d.deleted ON CONFLICT DO NOTHING"
    )
    n = cur.execute(
        "DELETE FROM chunks c USING documents d WHERE d.doc_id=c.doc_id AND (c.version<d.version OR d.deleted)"
    ).rowcount
    cur.execute(
        "DELETE FROM versions v USING documents d WHERE d.doc_id=v.doc_id AND (v.version<d.version OR d.deleted)"
    )
    return int(n)


def ensure_embedder(cur: Cursor, ident: str) -> str | None:
    """Record the embedder identity; returns the previous one when it differed (its vectors are then dropped)."""
    row = cur.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
    if row is not None and row[0] != ident:
        cur.execute("UPDATE chunks SET embedding=NULL WHERE embedding IS NOT NULL")
        cur.execute("UPDATE history_chunks SET embedding=NULL WHERE embedding IS NOT NULL")
        cur.execute("UPDATE documents SET indexed_at=NULL, lag_ms=NULL")
    cur.execute(
        "INSERT INTO meta(key, value) VALUES('embedder', %s) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (ident,),
    )
    return row[0] if row is not None and row[0] != ident else None
