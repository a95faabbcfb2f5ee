"""A store that already holds a large embedded corpus, so a server starts on 100k or 1M chunks in seconds.

Writes the same rows `Store.upsert` + the worker's `save_applied` would (documents, versions, one chunk
per document with its embedding, the change log, the embedder record) in bulk transactions, once per
corpus size; the file is cached under .kfresh/bench-cache/ and each run works on a copy. The server then
starts the way it does after a crash without a snapshot: it rebuilds the index from the stored vectors
(and trains IVF when index.kind=ivf). Document ids are `c<i>`, i the row of the vectors.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kfresh.benchmarks.corpus import CACHE_DIR, VERSION
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.rows import SCHEMA, content_hash

EMBEDDER_ID = "packaged:all-MiniLM-L6-v2|384"  # what Store.ensure_embedder records for the default embedder
ACKED_AT = 1_780_000_000.0


def doc_id(i: int) -> str:
    return f"c{i}"


def row_of(doc: str) -> int:
    return int(doc[1:]) if doc.startswith("c") and doc[1:].isdigit() else -1


def build_store(path: Path, vectors: np.ndarray, text_of: Callable[[int], str], *, batch: int = 20_000) -> Path:
    """Write an embedded store of len(vectors) one-chunk documents to `path` (replaced if present)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".building")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # a cache file being built: durability comes from the rename
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('embedder', ?)", (EMBEDDER_ID,))
    for start in range(0, len(vectors), batch):
        rows = range(start, min(len(vectors), start + batch))
        docs = [(doc_id(i), text_of(i)) for i in rows]
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO documents(doc_id, version, valid_from, source, metadata, supersedes, text, content_hash,"
            " deleted, acked_at, indexed_at, lag_ms) VALUES(?,1,?,'bench','{}','[]',?,?,0,?,?,0)",
            [(d, ACKED_AT, t, content_hash(DocumentIn(d, t, source="bench", valid_from=ACKED_AT)), ACKED_AT, ACKED_AT)
             for d, t in docs],
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO versions(doc_id, version, valid_from, source, metadata, supersedes) VALUES(?,1,?,'bench','{}','[]')",
            [(d, ACKED_AT) for d, _ in docs],
        )
        conn.executemany(
            "INSERT INTO chunks(chunk_id, doc_id, version, ordinal, text, embedding) VALUES(?,?,1,0,?,?)",
            [(i + 1, d, t, np.ascontiguousarray(vectors[i], dtype=np.float32).tobytes()) for i, (d, t) in zip(rows, docs)],
        )
        conn.executemany("INSERT INTO changes(doc_id, version, op, at) VALUES(?,1,'upsert',?)", [(d, ACKED_AT) for d, _ in docs])
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    Path(f"{tmp}-wal").unlink(missing_ok=True)
    Path(f"{tmp}-shm").unlink(missing_ok=True)
    tmp.rename(path)
    return path


def cached_store(name: str, vectors: np.ndarray, text_of: Callable[[int], str], *, cache_dir: Path = CACHE_DIR) -> Path:
    """The cached store file for corpus `name` (built on first use)."""
    path = cache_dir / f"store-{VERSION}-{name}-{len(vectors)}.db"
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        started = time.perf_counter()
        build_store(path, vectors, text_of)
        meta.write_text(json.dumps({"docs": len(vectors), "build_s": round(time.perf_counter() - started, 1)}))
    return path


def home_with_store(store_file: Path, home: Path) -> Path:
    """A server home whose kfresh.db is a copy of `store_file` (no snapshot: the server rebuilds the index)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store_file, home / "kfresh.db")
    return home
