"""The SQLite store's write transactions, each run on the writer connection inside one BEGIN IMMEDIATE
transaction (sqlite.py `_txn`). Several may share one transaction (a group commit: `write_many`), so none
of them ends it; one that decides to write nothing just returns (an empty COMMIT flushes nothing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence

from kfresh.indexer.documents import Ack, DocumentIn
from kfresh.indexer.rows import CHUNK_COLUMNS, Applied, content_hash, vec_to_blob

# History (the `history` and `history_chunks` tables): every version keeps its attributes and the system times
# it was acknowledged and ended (by the next upsert or a delete); a replaced version's chunk rows move to
# history_chunks instead of being lost.
END_VERSION = "UPDATE history SET ended_at=?, ended_by=? WHERE doc_id=? AND ended_at IS NULL"


def upsert(w: sqlite3.Connection, doc: DocumentIn, chunks: Sequence[str], now: float | None) -> Ack:
    """A new version of `doc` with its chunks and a change-log entry, or nothing when the content is unchanged."""
    digest = content_hash(doc)
    cur = w.execute(
        "SELECT version, deleted, content_hash, acked_at FROM documents WHERE doc_id=?", (doc.id,)
    ).fetchone()
    if cur is not None and not cur[1] and cur[2] == digest:
        return _unchanged_ack(w, doc.id, cur[0], cur[3])
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
    w.execute(END_VERSION, (acked_at, "upsert", doc.id))
    w.execute(
        "INSERT INTO history(doc_id, version, valid_from, source, metadata, supersedes, acked_at)"
        " VALUES(?,?,?,?,?,?,?)",
        (doc.id, version, valid_from, doc.source, meta, sup, acked_at),
    )
    w.executemany(
        "INSERT INTO chunks(doc_id, version, ordinal, text, embedding) VALUES(?,?,?,?,NULL)",
        [(doc.id, version, i, text) for i, text in enumerate(chunks)],
    )
    seq = w.execute(
        "INSERT INTO changes(doc_id, version, op, at) VALUES(?,?,'upsert',?)", (doc.id, version, acked_at)
    ).lastrowid
    return Ack(id=doc.id, version=version, status="stored", chunks=len(chunks), seq=_rowid(seq), acked_at=acked_at)


def _unchanged_ack(w: sqlite3.Connection, doc_id: str, version: int, acked_at: float) -> Ack:
    (n,) = w.execute("SELECT COUNT(*) FROM chunks WHERE doc_id=? AND version=?", (doc_id, version)).fetchone()
    (seq,) = w.execute("SELECT COALESCE(MAX(seq), 0) FROM changes WHERE doc_id=?", (doc_id,)).fetchone()
    return Ack(id=doc_id, version=version, status="unchanged", chunks=n, seq=seq, acked_at=acked_at)


def delete(w: sqlite3.Connection, doc_id: str, now: float | None) -> Ack:
    """Mark `doc_id` deleted under a new version; its chunk rows stay until the worker drops them from the index."""
    cur = w.execute("SELECT version, deleted FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
    if cur is None or cur[1]:
        version = 0 if cur is None else cur[0]
        return Ack(id=doc_id, version=version, status="not_found", chunks=0, seq=0, acked_at=time.time())
    version = cur[0] + 1
    acked_at = time.time() if now is None else now
    w.execute(
        "UPDATE documents SET version=?, deleted=1, acked_at=?, indexed_at=NULL, lag_ms=NULL WHERE doc_id=?",
        (version, acked_at, doc_id),
    )
    w.execute(END_VERSION, (acked_at, "delete", doc_id))
    seq = w.execute(
        "INSERT INTO changes(doc_id, version, op, at) VALUES(?,?,'delete',?)", (doc_id, version, acked_at)
    ).lastrowid
    return Ack(id=doc_id, version=version, status="deleted", chunks=0, seq=_rowid(seq), acked_at=acked_at)


def save_applied(w: sqlite3.Connection, applied: Sequence[Applied]) -> None:
    """Embeddings of what the worker made searchable, its indexed_at/lag, and the older versions' rows gone."""
    for a in applied:
        if a.chunk_ids is not None and a.vectors is not None:
            w.executemany(
                "UPDATE chunks SET embedding=? WHERE chunk_id=? AND embedding IS NULL",
                [(vec_to_blob(v), int(c)) for c, v in zip(a.chunk_ids, a.vectors)],
            )
        w.execute(
            "UPDATE documents SET indexed_at=?, lag_ms=? WHERE doc_id=? AND version=?",
            (a.indexed_at, a.lag_ms, a.doc_id, a.version),
        )
        w.execute(
            f"INSERT OR IGNORE INTO history_chunks SELECT {CHUNK_COLUMNS} FROM chunks WHERE doc_id=? AND version<?",
            (a.doc_id, a.version),
        )
        w.execute("DELETE FROM chunks WHERE doc_id=? AND version<?", (a.doc_id, a.version))
        w.execute("DELETE FROM versions WHERE doc_id=? AND version<?", (a.doc_id, a.version))


def backfill_history(w: sqlite3.Connection) -> int:
    """A store written before history was kept: each live document's current version becomes its first history
    row (acknowledged at its ack time, nothing ended), once, when the history is empty. Returns the rows added."""
    if w.execute("SELECT 1 FROM history LIMIT 1").fetchone() is not None:
        return 0
    return int(
        w.execute(
            "INSERT INTO history(doc_id, version, valid_from, source, metadata, supersedes, acked_at)"
            " SELECT d.doc_id, d.version, d.valid_from, d.source, d.metadata, d.supersedes, d.acked_at FROM documents d"
            " WHERE d.deleted=0"
        ).rowcount
        or 0
    )


def cleanup_stale(w: sqlite3.Connection) -> int:
    """Drop chunk and version rows of superseded or deleted versions (their chunks kept in history_chunks);
    returns the chunks dropped."""
    stale = (
        "SELECT c.chunk_id FROM chunks c JOIN documents d ON d.doc_id=c.doc_id WHERE c.version<d.version OR d.deleted=1"
    )
    w.execute(f"INSERT OR IGNORE INTO history_chunks SELECT {CHUNK_COLUMNS} FROM chunks WHERE chunk_id IN ({stale})")
    n = w.execute(f"DELETE FROM chunks WHERE chunk_id IN ({stale})").rowcount
    w.execute(
        "DELETE FROM versions WHERE rowid IN (SELECT v.rowid FROM versions v JOIN documents d"
        " ON d.doc_id=v.doc_id WHERE v.version<d.version OR d.deleted=1)"
    )
    return n


def ensure_embedder(w: sqlite3.Connection, ident: str) -> str | None:
    """Record the embedder identity; returns the previous one when it differed (its vectors are then dropped)."""
    row = w.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
    changed = row is not None and row[0] != ident
    if changed:
        w.execute("UPDATE chunks SET embedding=NULL")
        w.execute("UPDATE history_chunks SET embedding=NULL")
        w.execute("UPDATE documents SET indexed_at=NULL, lag_ms=NULL")
    w.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('embedder', ?)", (ident,))
    return row[0] if changed else None


def _rowid(value: int | None) -> int:
    assert value is not None, "INSERT did not produce a row id"
    return int(value)
