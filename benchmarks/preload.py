"""A store that already holds a large embedded corpus, so a server starts on 100k or 1M chunks in seconds.

Writes the same rows `Store.upsert` + the worker's `save_applied` would (documents, versions, one chunk
per document with its embedding, the change log, the embedder record) through the store's bulk load
(`SqliteStore.bulk_load`: batched transactions), once per corpus size; the file is cached under
.kfresh/bench-cache/ and each run works on a copy. The server then starts the way it does after a crash
without a snapshot: it rebuilds the index from the stored vectors (and trains IVF when index.kind=ivf). Document ids are `c<i>`, i the row of the vectors.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from kfresh.benchmarks.corpus import CACHE_DIR, VERSION
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.stores.sqlite import SqliteStore

EMBEDDER = ("packaged:all-MiniLM-L6-v2", 384)  # the default embedder (name, dim), as the server records it
ACKED_AT = 1_780_000_000.0


def doc_id(i: int) -> str:
    return f"c{i}"


def row_of(doc: str) -> int:
    return int(doc[1:]) if doc.startswith("c") and doc[1:].isdigit() else -1


MetadataOf = Callable[[int], dict[str, str]]


def build_store(path: Path, vectors: np.ndarray, text_of: Callable[[int], str], *, batch: int = 20_000,
                metadata_of: MetadataOf | None = None) -> Path:  # fmt: skip
    """Write an embedded store of len(vectors) one-chunk documents to `path` (replaced if present)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".building")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    with SqliteStore(tmp) as store:
        store.ensure_embedder(*EMBEDDER)
        # durable=False: a cache file being built, no fsync until the load's last checkpoint
        store.bulk_load(_documents(vectors, text_of, metadata_of), now=ACKED_AT, batch=batch, durable=False)
    Path(f"{tmp}-wal").unlink(missing_ok=True)
    Path(f"{tmp}-shm").unlink(missing_ok=True)
    tmp.rename(path)
    return path


def _documents(
    vectors: np.ndarray, text_of: Callable[[int], str], metadata_of: MetadataOf | None = None
) -> Iterator[tuple[DocumentIn, tuple[str], np.ndarray]]:
    """Document `c<i>` for each row i of `vectors`: one chunk, its whole text, with that row as its embedding."""
    for i in range(len(vectors)):
        text = text_of(i)
        meta = metadata_of(i) if metadata_of else {}
        yield (
            DocumentIn(doc_id(i), text, source="bench", valid_from=ACKED_AT, metadata=meta),
            (text,),
            vectors[i : i + 1],
        )


def cached_store(name: str, vectors: np.ndarray, text_of: Callable[[int], str], *, cache_dir: Path = CACHE_DIR,
                 metadata_of: MetadataOf | None = None) -> Path:  # fmt: skip
    """The cached store file for corpus `name` (built on first use; a corpus with metadata needs its own name)."""
    path = cache_dir / f"store-{VERSION}-{name}-{len(vectors)}.db"
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        started = time.perf_counter()
        build_store(path, vectors, text_of, metadata_of=metadata_of)
        meta.write_text(json.dumps({"docs": len(vectors), "build_s": round(time.perf_counter() - started, 1)}))
    return path


def home_with_store(store_file: Path, home: Path) -> Path:
    """A server home whose kfresh.db is a copy of `store_file` (no snapshot: the server rebuilds the index)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store_file, home / "kfresh.db")
    return home
