"""The background indexer: acknowledged changes -> embeddings -> an atomic swap in the vector index.

Micro-batches amortise the embedder (the CPU bottleneck). For each document only its newest acknowledged
version is applied; a batch's removals and additions happen under one write lock, so a search sees the
whole batch or none of it. The store write (embeddings, indexed_at, stale rows) follows the swap.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from kfresh.core import metrics
from kfresh.core.config import KfreshConfig
from kfresh.indexer.embedding.embedder import Embedder
from kfresh.indexer.freshness import LagRing
from kfresh.indexer.queue import Pending, WorkQueue
from kfresh.indexer.rows import Applied, DocAttrs
from kfresh.indexer.snapshot import SnapshotData, SnapshotWriter
from kfresh.indexer.state import IndexState, SeqTracker
from kfresh.indexer.stores import DocumentStore

log = logging.getLogger("kfresh.indexer")

MAX_ATTEMPTS = 3


@dataclass
class _Plan:
    item: Pending
    delete: bool
    ids: np.ndarray
    vecs: np.ndarray | None = None
    texts_to_embed: list[str] | None = None
    stored_vecs: list[np.ndarray | None] | None = None


class Worker:
    """One daemon thread that owns every index mutation; it logs and counts failures and never exits early."""

    def __init__(
        self,
        *,
        cfg: KfreshConfig,
        store: DocumentStore,
        state: IndexState,
        queue: WorkQueue,
        tracker: SeqTracker,
        embedder: Embedder,
        lags: LagRing,
        snapshots: SnapshotWriter,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.queue = queue
        self.tracker = tracker
        self.embedder = embedder
        self.lags = lags
        self.snapshots = snapshots
        self.failures = 0
        self.applied_changes = 0
        self.embedded_chunks = 0
        self._since_snapshot = 0
        self._snapshot_requested = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kfresh-indexer", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop after the batch in progress; what is still queued is durable and indexed at the next start.
        False if the thread is still busy after `timeout_s` (e.g. a hung embedder)."""
        self._stop.set()
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- loop --------------------------------------------------------------------------------------
    def _run(self) -> None:
        ecfg = self.cfg.embedder
        while not self._stop.is_set():
            try:
                batch = self.queue.take(max_chunks=ecfg.batch_size, max_wait_s=ecfg.max_wait_ms / 1000)
                if batch:
                    self._process_or_retry(batch)
                self._maybe_snapshot()
                self._maybe_maintain()
            except Exception:  # never die: log, count, keep serving
                self.failures += 1
                log.exception("worker.loop_failed")
                time.sleep(0.05)

    def _process_or_retry(self, batch: list[Pending]) -> None:
        try:
            self._process(batch)
            return
        except Exception:
            self.failures += 1
            log.exception("worker.batch_failed items=%d: retrying one by one", len(batch))
        for item in batch:  # isolate a poisonous document from its batch-mates
            try:
                self._process([item])
            except Exception:
                self.failures += 1
                if item.attempts + 1 < MAX_ATTEMPTS:
                    log.exception("worker.item_failed doc_id=%s version=%d: requeued", item.doc_id, item.version)
                    self.queue.put(replace(item, attempts=item.attempts + 1), reserved=True)
                    continue
                # Still unembedded in the store: the next start() enqueues it again.
                log.exception("worker.item_dropped doc_id=%s version=%d", item.doc_id, item.version)
                self.queue.release(1)
                self.tracker.done([item.seq])

    def _process(self, batch: list[Pending]) -> None:
        latest: dict[str, Pending] = {}
        for item in batch:
            if item.doc_id not in latest or item.version > latest[item.doc_id].version:
                latest[item.doc_id] = item
        with metrics.INDEXER_STAGE.labels("plan").time():
            plans = [p for p in (self._plan(item) for item in latest.values()) if p is not None]
        if plans:
            with metrics.INDEXER_STAGE.labels("embed").time():
                self._embed(plans)
            with metrics.INDEXER_STAGE.labels("swap").time():
                self._swap(plans)
        searchable_at = time.time()
        applied = [
            Applied(
                doc_id=p.item.doc_id,
                version=p.item.version,
                deleted=p.delete,
                indexed_at=searchable_at,
                lag_ms=(searchable_at - p.item.acked_at) * 1000,
                chunk_ids=None if p.delete else p.ids,
                vectors=p.vecs,
            )
            for p in plans
        ]
        # A foreign change's owner saves it; this replica writes only vectors it had to embed itself.
        with metrics.INDEXER_STAGE.labels("save").time():
            self.store.save_applied([a for p, a in zip(plans, applied) if not p.item.foreign or p.texts_to_embed])
        for p, a in zip(plans, applied):
            if p.item.foreign:
                metrics.REPLICA_LAG.observe(max(a.lag_ms, 0.0) / 1000)
            elif not p.item.recovered:  # a restart's downtime is not indexing lag
                self.lags.record(a.lag_ms)
                metrics.FRESHNESS_LAG.observe(a.lag_ms / 1000)
        self.applied_changes += len(batch)
        self._since_snapshot += len(batch)
        self.queue.release(len(batch))
        self.tracker.done([item.seq for item in batch])
        self.state.notify_applied()

    def _plan(self, item: Pending) -> _Plan | None:
        """What to do for the newest queued change of a document; None when a newer one supersedes it."""
        cur = self.store.current(item.doc_id)
        if cur is None or cur.version != item.version:
            return None  # a newer acknowledged change is queued behind this one
        if cur.deleted:
            return _Plan(item, delete=True, ids=np.zeros(0, dtype=np.int64))
        if self.state.docmap.version(item.doc_id) >= item.version and not item.recovered:
            return None  # recovered items re-apply: their store write may be what was lost
        rows = self.store.chunks_for(item.doc_id, item.version)
        return _Plan(
            item,
            delete=False,
            ids=np.array([r.chunk_id for r in rows], dtype=np.int64),
            texts_to_embed=[r.text for r in rows if r.embedding is None],
            stored_vecs=[r.embedding for r in rows],
        )

    def _embed(self, plans: list[_Plan]) -> None:
        texts = [t for p in plans if not p.delete for t in (p.texts_to_embed or [])]
        fresh = self.embedder.encode(texts) if texts else np.zeros((0, self.embedder.dim), dtype=np.float32)
        self.embedded_chunks += len(texts)
        at = 0
        for p in plans:
            if p.delete:
                continue
            rows = []
            for stored in p.stored_vecs or []:
                if stored is None:
                    stored, at = fresh[at], at + 1
                rows.append(stored)
            p.vecs = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.embedder.dim), np.float32)

    def _swap(self, plans: list[_Plan]) -> None:
        st = self.state
        # Read before the lock: searches wait on the write lock, not on the store.
        attrs = self.store.attrs_of([(p.item.doc_id, p.item.version) for p in plans if not p.delete])
        with st.lock.write():
            old = [st.docmap.ids(p.item.doc_id) for p in plans]
            if old:
                st.index.remove(np.concatenate(old))
            adds = [p for p in plans if not p.delete and len(p.ids)]
            if adds:
                st.index.add(np.concatenate([p.ids for p in adds]), np.concatenate([p.vecs for p in adds]))
            st.unsaved = {int(i): v for p in adds for i, v in zip(p.ids, p.vecs)}  # type: ignore[arg-type]
            for p in plans:
                if p.delete:
                    st.docmap.pop(p.item.doc_id)
                    st.meta.pop(p.item.doc_id)
                else:
                    st.docmap.set(p.item.doc_id, p.item.version, p.ids)
                    st.meta.put(p.item.doc_id, attrs.get(p.item.doc_id) or DocAttrs({}))
                st.unhide_upto(p.item.doc_id, p.item.version)

    # -- background chores -------------------------------------------------------------------------
    def _maybe_maintain(self) -> None:
        index = self.state.index
        if not index.needs_maintenance():
            return
        started = time.perf_counter()
        prepared = index.prepare_maintenance()  # slow part; searches continue (only this thread writes)
        with self.state.lock.write():
            index.apply_maintenance(prepared)
        log.info("worker.maintained kind=%s ms=%.1f", index.kind, (time.perf_counter() - started) * 1000)

    def request_snapshot(self) -> None:
        """Have the worker thread snapshot at its next turn (e.g. after a rebuild at start)."""
        self._snapshot_requested.set()

    def _maybe_snapshot(self) -> None:
        if self._snapshot_requested.is_set() or self._since_snapshot >= self._snapshot_threshold():
            self._snapshot_requested.clear()
            self.snapshot()

    def _snapshot_threshold(self) -> int:
        """Applied changes between snapshots: the fixed count, or a share of the index when that is larger, so a
        snapshot (the whole index) costs the same per change at 100k vectors as at 10M. The document map's count
        is in memory (a remote index's ntotal would be a query on every turn of the loop)."""
        icfg = self.cfg.index
        return max(icfg.snapshot_every_changes, int(icfg.snapshot_every_fraction * self.state.docmap.total_ids))

    def capture(self) -> SnapshotData:
        """Snapshot bytes of the current state; only call from the worker thread or when it is stopped.
        Under the lock only cheap copies are taken; serialising them happens on the snapshot thread."""
        st = self.state
        started = time.perf_counter()
        with st.lock.read():
            seq = self.tracker.watermark()
            data = SnapshotData(
                kind=st.index.kind,
                dim=self.embedder.dim,
                embedder=self.embedder.name,
                applied_seq=seq,
                index_bytes=st.index.snapshot_later(),
                map_bytes=st.docmap.snapshot_later(),
            )
        self._since_snapshot = 0
        log.info("snapshot.captured applied_seq=%d ms=%.1f", seq, (time.perf_counter() - started) * 1000)
        return data

    def snapshot(self) -> None:
        self.snapshots.submit(self.capture())
