"""Bring the vector index back at start: snapshot + replay of later changes, or a rebuild from the store.

Either way only stored embeddings are used; documents still lacking them are re-queued by the caller.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from kfresh.core.config import IndexConfig
from kfresh.indexer.docmap import DocMap
from kfresh.indexer.embedding.embedder import Embedder
from kfresh.indexer.metaindex import MetaIndex
from kfresh.indexer.snapshot import load_snapshot
from kfresh.indexer.state import IndexState
from kfresh.indexer.stores import DocumentStore
from kfresh.indexer.vectors import VectorIndex, create_index

log = logging.getLogger("kfresh.indexer")

_PROGRESS_MIN = 20_000  # show a progress bar only when it is worth watching


@dataclass
class Recovered:
    state: IndexState
    rebuilt: bool


def recover_index(store: DocumentStore, cfg: IndexConfig, embedder: Embedder) -> Recovered:
    reset = store.ensure_embedder(embedder.name, embedder.dim)
    snap = None if reset else load_snapshot(cfg.snapshot_dir, cfg, dim=embedder.dim, embedder=embedder.name)
    if snap is not None and snap.applied_seq > store.max_seq():
        log.warning(
            "snapshot.ahead_of_store applied_seq=%d store_seq=%d: rebuilding", snap.applied_seq, store.max_seq()
        )
        snap = None
    if snap is None:
        index, docmap = rebuild(store, cfg, embedder.dim)
    else:
        index, docmap = snap.index, snap.docmap
        replay(store, index, docmap, snap.applied_seq)
    index.maintain()
    meta = MetaIndex.of(store.attrs_of([(d, docmap.version(d)) for d in docmap]).items())
    return Recovered(IndexState(index=index, docmap=docmap, meta=meta), rebuilt=snap is None)


def rebuild(store: DocumentStore, cfg: IndexConfig, dim: int) -> tuple[VectorIndex, DocMap]:
    """A fresh index holding every stored embedding of every live document's current version."""
    started = time.perf_counter()
    index = create_index(cfg, dim)
    per_doc: dict[str, tuple[int, list[np.ndarray]]] = {}
    total = store.counts()[1]
    with tqdm(total=total, desc="rebuild index", unit="vec", disable=total < _PROGRESS_MIN) as bar:
        for doc_ids, versions, ids, vecs in store.iter_embedded():
            index.add(ids, vecs)
            for doc_id, version, cid in zip(doc_ids, versions, ids.tolist()):
                per_doc.setdefault(doc_id, (version, []))[1].append(cid)
            bar.update(len(ids))
    docmap = DocMap()
    for doc_id, (version, cids) in per_doc.items():
        docmap.set(doc_id, version, np.asarray(cids, dtype=np.int64))
    ms = (time.perf_counter() - started) * 1000
    log.info("index.rebuilt vectors=%d docs=%d ms=%.0f", index.ntotal, len(docmap), ms)
    return index, docmap


def replay(store: DocumentStore, index: VectorIndex, docmap: DocMap, applied_seq: int) -> None:
    """Apply every change after the snapshot: each touched document is set to its current stored state."""
    docs = store.docs_changed_since(applied_seq)
    if not docs:
        return
    started = time.perf_counter()
    removed, add_ids, add_vecs = [], [], []
    for doc_id in tqdm(docs, desc="replay changes", unit="doc", disable=len(docs) < _PROGRESS_MIN):
        removed.append(docmap.pop(doc_id))
        cur = store.current(doc_id)
        if cur is None or cur.deleted:
            continue
        rows = store.chunks_for(doc_id, cur.version)
        stored = [r.embedding for r in rows if r.embedding is not None]
        if rows and len(stored) == len(rows):
            ids = np.array([r.chunk_id for r in rows], dtype=np.int64)
            add_ids.append(ids)
            add_vecs.append(np.stack(stored))
            docmap.set(doc_id, cur.version, ids)
    if removed:
        index.remove(np.concatenate(removed))
    if add_ids:
        index.add(np.concatenate(add_ids), np.concatenate(add_vecs))
    log.info(
        "index.replayed after_seq=%d docs=%d readded=%d ms=%.0f",
        applied_seq,
        len(docs),
        len(add_ids),
        (time.perf_counter() - started) * 1000,
    )
