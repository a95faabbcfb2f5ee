"""SQLite tables of the document store (the rows of `indexer/rows.py`); PostgreSQL's are in pg_schema.py.

chunk_id and seq are AUTOINCREMENT: int64, never reused, so chunk ids are FAISS ids. Embeddings are float32
bytes (BLOB); metadata and supersedes JSON text; deleted 0/1.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents(
    doc_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    valid_from REAL NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    acked_at REAL NOT NULL,
    indexed_at REAL,
    lag_ms REAL
);
CREATE TABLE IF NOT EXISTS versions(
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    valid_from REAL NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    PRIMARY KEY(doc_id, version)
);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, version);
CREATE INDEX IF NOT EXISTS chunks_unembedded ON chunks(doc_id) WHERE embedding IS NULL;
CREATE TABLE IF NOT EXISTS changes(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    op TEXT NOT NULL CHECK(op IN ('upsert', 'delete')),
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_doc ON changes(doc_id, seq);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS citations(doc_id TEXT NOT NULL, version INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS citations_by_doc ON citations(doc_id, version);
CREATE TABLE IF NOT EXISTS history(
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    valid_from REAL NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    acked_at REAL NOT NULL,
    ended_at REAL,
    ended_by TEXT CHECK(ended_by IN ('upsert', 'delete')),
    PRIMARY KEY(doc_id, version)
);
CREATE INDEX IF NOT EXISTS history_by_time ON history(acked_at);
CREATE TABLE IF NOT EXISTS history_chunks(
    chunk_id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS history_chunks_by_doc ON history_chunks(doc_id, version);
CREATE TABLE IF NOT EXISTS erasures(seq INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers(
    answer_id TEXT PRIMARY KEY, at REAL NOT NULL, question TEXT NOT NULL, replay_of TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_time ON answers(at);
CREATE TABLE IF NOT EXISTS answer_passages(
    answer_id TEXT NOT NULL, doc_id TEXT NOT NULL, version INTEGER NOT NULL, shown INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS answer_passages_by_doc ON answer_passages(doc_id);
CREATE INDEX IF NOT EXISTS answer_passages_by_answer ON answer_passages(answer_id);
"""
