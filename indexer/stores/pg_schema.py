"""PostgreSQL tables of the document store (the same rows as SQLite's, `indexer/rows.py`) and its constants.

chunk_id and seq are identity columns: int64, never reused, so chunk ids are FAISS ids as they are in SQLite.
Embeddings are float32 bytes (BYTEA); metadata and supersedes the same JSON text SQLite holds.
"""

from __future__ import annotations

# pg_advisory_xact_lock key ("kfresh" in ASCII): every write transaction that touches documents, versions,
# chunks or changes takes it first, so versions never race and the change log's seq order is commit order.
WRITE_LOCK_KEY = 0x6B6672657368

# NOTIFY channel: each transaction that appends to `changes` notifies it (delivered at COMMIT).
CHANNEL = "kfresh_changes"

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents(
    doc_id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    valid_from DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    acked_at DOUBLE PRECISION NOT NULL,
    indexed_at DOUBLE PRECISION,
    lag_ms DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS versions(
    doc_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    valid_from DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    PRIMARY KEY(doc_id, version)
);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BYTEA
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id, version);
CREATE INDEX IF NOT EXISTS chunks_unembedded ON chunks(doc_id) WHERE embedding IS NULL;
CREATE TABLE IF NOT EXISTS changes(
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    op TEXT NOT NULL CHECK(op IN ('upsert', 'delete')),
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_doc ON changes(doc_id, seq);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS citations(doc_id TEXT NOT NULL, version BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS citations_by_doc ON citations(doc_id, version);
CREATE TABLE IF NOT EXISTS history(
    doc_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    valid_from DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    metadata TEXT NOT NULL,
    supersedes TEXT NOT NULL,
    acked_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    ended_by TEXT CHECK(ended_by IN ('upsert', 'delete')),
    PRIMARY KEY(doc_id, version)
);
CREATE INDEX IF NOT EXISTS history_by_time ON history(acked_at);
CREATE TABLE IF NOT EXISTS history_chunks(
    chunk_id BIGINT PRIMARY KEY,
    doc_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    embedding BYTEA
);
CREATE INDEX IF NOT EXISTS history_chunks_by_doc ON history_chunks(doc_id, version);
CREATE TABLE IF NOT EXISTS erasures(
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, doc_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS answers(
    answer_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, question TEXT NOT NULL, replay_of TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_time ON answers(at);
CREATE TABLE IF NOT EXISTS answer_passages(
    answer_id TEXT NOT NULL, doc_id TEXT NOT NULL, version BIGINT NOT NULL, shown BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS answer_passages_by_doc ON answer_passages(doc_id);
CREATE INDEX IF NOT EXISTS answer_passages_by_answer ON answer_passages(answer_id);
"""
