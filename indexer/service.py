"""The Indexer facade used by the gRPC server: durable acks in, fresh searches out.

An upsert reserves queue room, commits to SQLite (the Ack), then hands the change to the background
worker; a search embeds the query and reads a consistent view of the vector index. start() restores the
index from a snapshot (or rebuilds it from stored embeddings) and re-queues whatever was acknowledged but
never embedded, so a SIGKILL loses nothing that was acknowledged and re-embeds nothing that was embedded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np

from kfresh.core import metrics
from kfresh.core.config import KfreshConfig
from kfresh.core.errors import Cancelled, InvalidInput, NotFound, Overloaded, StorageFull, Unavailable
from kfresh.indexer import validation
from kfresh.indexer.chunking import split
from kfresh.indexer.documents import Ack, DocumentIn, HistoryStats, Hit, IndexStats, WriteOp
from kfresh.indexer.embedding.embedder import Embedder, create_embedder
from kfresh.indexer.filters import Filter, as_filter
from kfresh.indexer.follower import ChangeFollower, follow_enabled
from kfresh.indexer.freshness import LagRing, RateMeter
from kfresh.indexer.query_cache import QueryEmbeddings
from kfresh.indexer.queue import Pending, WorkQueue
from kfresh.indexer.recovery import recover_index
from kfresh.indexer.rows import ChangeRow, DocState, Erased, LoggedAnswerRow
from kfresh.indexer.search import search_index
from kfresh.indexer.snapshot import SnapshotWriter, write_snapshot
from kfresh.indexer.state import IndexState, SeqTracker
from kfresh.indexer.stores import DocumentStore, StoreError, open_store
from kfresh.indexer.timeline import Timeline, TimelineStats
from kfresh.indexer.worker import Worker

log = logging.getLogger("kfresh.indexer")


def _checkpoint(cancel: threading.Event | None, stage: str) -> None:
    """Stop a search whose caller went away: after `stage`, nothing more is computed for it."""
    if cancel is not None and cancel.is_set():
        metrics.SEARCHES_ABANDONED.labels(stage).inc()
        raise Cancelled(f"the search was cancelled by its caller (after: {stage})")


class Indexer:
    """Streaming retrieval index over a durable document store. Thread-safe; call start() first."""

    def __init__(self, cfg: KfreshConfig, *, embedder: Embedder | None = None) -> None:
        self.cfg = cfg
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._queries: QueryEmbeddings | None = None
        self._lifecycle = threading.Lock()
        self._started = False
        self._store: DocumentStore | None = None
        self._state: IndexState | None = None
        self._worker: Worker | None = None
        self._follower: ChangeFollower | None = None
        self._snapshots: SnapshotWriter | None = None
        self._queue = WorkQueue(cfg.embedder.queue_size)
        self._tracker = SeqTracker(0)
        self._lags = LagRing()
        self._ingest_rate = RateMeter()
        # (change-log seq, store.counts(), store.history_counts()) for stats()
        self._counts: tuple[int, tuple[int, int, int], tuple[int, int]] | None = None
        self._timeline: Timeline | None = None  # the history in memory, built by the first time-slice search
        self._timeline_lock = threading.Lock()
        self._slice_ms = LagRing(1000)  # time-slice search latencies (ms), for stats()

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        """The embedder, loaded on first use (from the packaged model unless one was passed in)."""
        if self._embedder is None:
            with self._embedder_lock:
                if self._embedder is None:
                    self._embedder = create_embedder(self.cfg)
        return self._embedder

    @property
    def query_embeddings(self) -> QueryEmbeddings:
        """Query text -> vector through the LRU cache (retrieval.query_cache_size)."""
        if self._queries is None:
            embedder = self.embedder  # loads it (under the same lock) before the cache is made
            with self._embedder_lock:
                if self._queries is None:
                    self._queries = QueryEmbeddings(embedder, size=self.cfg.retrieval.query_cache_size)
        return self._queries

    def start(self) -> None:
        """Open the store, restore the index, re-queue unindexed acknowledged documents, start the worker."""
        with self._lifecycle:
            if self._started:
                return
            started = time.perf_counter()
            embedder = self.embedder
            split("warm-up", self.cfg.store)  # imports the splitter now, not inside the first ack (~0.5 s)
            store = open_store(self.cfg.store)
            follow = follow_enabled(self.cfg)
            try:
                start_seq = store.max_seq()  # recovery covers every change up to here; the follower the rest
                recovered = recover_index(store, self.cfg.index, embedder)
            except BaseException:
                store.close()
                raise
            self._store, self._state = store, recovered.state
            recovered.state.index.use_queries(lambda: self.query_embeddings.recent(256))  # auto tunes on them
            self._queue = WorkQueue(self.cfg.embedder.queue_size)
            self._tracker = SeqTracker(start_seq, follow=follow)  # start() holds the lifecycle lock: no local ack since
            for doc, chunks in store.unembedded():
                self._tracker.register_recovered(doc.seq)
                self._queue.put(
                    Pending(doc.doc_id, doc.version, "upsert", doc.seq, doc.acked_at, chunks, recovered=True),
                    reserved=False,
                )
            self._snapshots = SnapshotWriter(self.cfg.index.snapshot_dir)
            self._worker = Worker(
                cfg=self.cfg,
                store=store,
                state=recovered.state,
                queue=self._queue,
                tracker=self._tracker,
                embedder=embedder,
                lags=self._lags,
                snapshots=self._snapshots,
            )
            if recovered.rebuilt:
                self._worker.request_snapshot()
            requeued = len(self._queue)
            self._worker.start()
            if follow:
                self._follower = ChangeFollower(
                    store=store,
                    state=recovered.state,
                    queue=self._queue,
                    tracker=self._tracker,
                    cfg=self.cfg.replication,
                    after_seq=start_seq,
                )
                self._follower.start()
            self._started = True
            log.info(
                "indexer.started vectors=%d requeued=%d rebuilt=%s ms=%.0f",
                recovered.state.index.ntotal,
                requeued,
                recovered.rebuilt,
                (time.perf_counter() - started) * 1000,
            )

    def close(self) -> None:
        """Stop the worker after its current batch, write a final snapshot, close the store."""
        with self._lifecycle:
            if not self._started:
                return
            self._started = False
            assert self._worker and self._snapshots and self._store
            if self._follower is not None:
                self._follower.stop(timeout_s=10)
                self._follower = None
            stopped = self._worker.stop(timeout_s=60)
            try:
                self._snapshots.close()
                if stopped:  # capturing while the worker still mutates the index would be inconsistent
                    write_snapshot(self.cfg.index.snapshot_dir, self._worker.capture())
                else:
                    log.error("indexer.worker_did_not_stop: no final snapshot; the next start replays the store")
            except Exception:
                log.exception("indexer.final_snapshot_failed: the next start replays from the store")
            if stopped and self._state is not None:
                with self._state.lock.write():  # after searches in flight: a milvus index drops its connection
                    self._state.index.close()
            self._store.close()
            self._timeline = None  # the next start may open another store: rebuilt by its first time-slice search
            log.info("indexer.closed")

    def __enter__(self) -> Indexer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        """Started and the background worker (and the change follower, when following) is running."""
        following = self._follower is None or self._follower.alive
        return self._started and self._worker is not None and self._worker.alive and following

    @property
    def worker_failures(self) -> int:
        return self._worker.failures if self._worker else 0

    def _require_started(self) -> tuple[DocumentStore, IndexState]:
        if not self._started or self._store is None or self._state is None:
            raise Unavailable("the indexer is not started")
        return self._store, self._state

    # -- writes ------------------------------------------------------------------------------------
    def upsert(self, doc: DocumentIn) -> Ack:
        """Durably store `doc` (a new version unless unchanged) and queue it for indexing."""
        return self.write_many([WriteOp(doc.id, doc)])[0]

    def delete(self, doc_id: str) -> Ack:
        """Durably delete; once this returns no search shows the document, the index catches up after."""
        return self.write_many([WriteOp(doc_id)])[0]

    def write_many(self, ops: Sequence[WriteOp]) -> list[Ack]:
        """Durably apply the first ops in ONE store transaction (a group commit) and queue them for indexing.

        Every op is validated first (InvalidInput: nothing written). Returns one ack per applied op, in order:
        as many ops as the indexing queue has room for, at least one (Overloaded when it stays full), and none after
        an op the store refused for its `owner` (its ack says "forbidden").
        """
        store, state = self._require_started()
        prepared = [self._prepare(op) for op in ops]
        taken = self._queue.reserve_up_to(len(prepared), self.cfg.embedder.queue_wait_ms / 1000)
        if not taken and prepared:
            raise Overloaded(f"indexing queue is full ({self.cfg.embedder.queue_size} changes waiting); retry later")
        prepared = prepared[:taken]
        try:
            with self._tracker.lock:
                acks = store.write_many(prepared)
                for op, ack in zip(prepared, acks):
                    if ack.status in ("stored", "deleted"):
                        self._tracker.register(ack.seq)
                    if ack.status == "deleted":
                        state.hide(op.doc_id, ack.version)
        except StoreError as exc:
            self._queue.release(taken)
            log.exception("indexer.store_write_failed ops=%d first=%s", len(prepared), prepared[0].doc_id)
            raise _write_error(exc) from exc
        except BaseException:
            self._queue.release(taken)
            raise
        if len(acks) < len(prepared):  # the store stopped at a forbidden op: the rest was not applied
            self._queue.release(len(prepared) - len(acks))
        for op, ack in zip(prepared, acks):
            if ack.status not in ("stored", "deleted"):
                self._queue.unreserve()  # unchanged / not_found / forbidden: nothing to index
                continue
            self._queue.put(Pending(op.doc_id, ack.version, op.op, ack.seq, ack.acked_at, ack.chunks))
            if op.doc is not None:
                self._ingest_rate.record()
        return acks

    def _prepare(self, op: WriteOp) -> WriteOp:
        if op.doc is None:
            validation.check_doc_id(op.doc_id)
            return op
        validation.check_document(op.doc, self.cfg.store)
        return replace(op, chunks=tuple(split(op.doc.text, self.cfg.store)))

    def record_citations(self, pairs: list[tuple[str, int]]) -> int:
        """Durably log the (doc_id, version) passages an answer showed the model."""
        store, _ = self._require_started()
        try:
            return store.record_citations(pairs)
        except StoreError as exc:
            raise Unavailable(f"the document store could not record citations: {exc}") from exc

    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        """How often each (doc_id, version) was shown to the model by an answer since `since`."""
        store, _ = self._require_started()
        return store.citation_counts(since=since)

    def purge(self, doc_id: str) -> tuple[Ack, Erased]:
        """Delete `doc_id` when it is live (queued for the index like any delete), then erase every row of it the
        store still holds, the answer log's included (`DocumentStore.erase`). NotFound when it was never stored."""
        store, _ = self._require_started()
        ack = self.write_many([WriteOp(doc_id)])[0]
        try:
            erased = store.erase(doc_id)
        except StoreError as exc:
            raise Unavailable(
                f"the document store could not erase {doc_id!r}: {exc}; the purge can be retried"
            ) from exc
        if erased is None:
            raise NotFound(f"document {doc_id!r} does not exist")
        log.info("indexer.purged doc_id=%s seq=%d %s", doc_id, ack.seq, erased)
        return ack, erased

    def snapshot_at_least(self, seq: int, timeout_s: float) -> bool:
        """Have a snapshot holding every change up to `seq` written (at once, not at the next threshold); True once
        it is on disk. After a purge: the older snapshot file, which still held its vectors, is replaced."""
        self._require_started()
        assert self._worker is not None and self._snapshots is not None
        if self._snapshots.written_seq >= seq:
            return True
        self._worker.request_snapshot()
        return self._snapshots.wait_written(seq, timeout_s)

    # -- the answer log (server/answer_log.py) ---------------------------------------------------
    def record_answer(self, answer: LoggedAnswerRow, shown: Sequence[tuple[str, int]],
                      superseded: Sequence[tuple[str, int]] = ()) -> None:  # fmt: skip
        """Durably add one answer to the answer log (`DocumentStore.record_answer`)."""
        store, _ = self._require_started()
        try:
            store.record_answer(answer, shown, superseded)
        except StoreError as exc:
            raise Unavailable(f"the document store could not log the answer: {exc}") from exc

    def logged_answer(self, answer_id: str) -> LoggedAnswerRow | None:
        """One logged answer, or None (never logged, or past the retention)."""
        store, _ = self._require_started()
        return store.logged_answer(answer_id)

    def prune_answers(self, before: float) -> int:
        """Drop logged answers older than `before` (unix seconds); returns how many."""
        store, _ = self._require_started()
        return store.prune_answers(before)

    # -- reads -------------------------------------------------------------------------------------
    def search(
        self,
        query: str,
        k: int,
        filters: Filter | Mapping[str, str] | None = None,
        *,
        with_vectors: bool = False,
        default_k: int | None = None,
        as_of: float | None = None,
        valid_at: float | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Hit]:
        """Top-k chunks for `query` among the newest indexed versions that `filters` selects (a Filter, or a map
        of metadata equalities): the exact filtered top k on exact indexes, whatever share matches.
        k=0 means `default_k` (the calling RPC's default), or retrieval.default_k when that is None.
        `as_of` / `valid_at` (unix seconds): search that slice of the history instead (`indexer/timeline.py`):
        the knowledge base as it stood at `as_of`, what the documents say was true at `valid_at`; an exact scan.
        `cancel` set (the caller's RPC was cancelled): raises Cancelled at the next stage boundary instead of
        running the rest (the wait for a thread, the query embedding, the history refresh are the long stages)."""
        store, _ = self._require_started()
        validation.check_query(query, self.cfg.retrieval)
        k = validation.check_k(k, self.cfg.retrieval, default_k)
        chosen = as_filter(filters)
        _checkpoint(cancel, "queued")
        vec = self.query_embeddings.encode(query)
        _checkpoint(cancel, "embedded")
        if as_of is None and valid_at is None:
            return self._search(vec, k, chosen, with_vectors)
        return self._search_slice(store, vec, k, chosen, as_of=as_of, valid_at=valid_at, with_vectors=with_vectors,
                                  cancel=cancel)  # fmt: skip

    def _search_slice(self, store: DocumentStore, q: np.ndarray, k: int, filters: Filter, *, as_of: float | None,
                      valid_at: float | None, with_vectors: bool, cancel: threading.Event | None = None) -> list[Hit]:  # fmt: skip
        """The exact top k of the history's slice (`timeline.py`), its texts read from the store."""
        started = time.perf_counter()
        with self._timeline_lock:
            if self._timeline is None:
                self._timeline = Timeline(self.embedder.dim)
            timeline = self._timeline
        try:
            timeline.refresh(store, self.embedder)
            _checkpoint(cancel, "sliced")
            found = timeline.search(q, k, filters, as_of=as_of, valid_at=valid_at)
            texts = store.chunk_texts([h.chunk_id for h in found])
        except StoreError as exc:
            raise Unavailable(f"the document store is unavailable: {exc}") from exc
        hits = [
            Hit(doc_id=h.row.doc_id, version=h.row.version, chunk_id=h.chunk_id, ordinal=h.ordinal,
                text=texts[h.chunk_id], score=h.score, source=h.row.source, valid_from=h.row.valid_from,
                metadata=dict(h.row.metadata), supersedes=h.row.supersedes,
                vector=h.vector if with_vectors else None, acked_at=h.row.acked_at)
            for h in found if h.chunk_id in texts  # a chunk purged since the search is left out
        ]  # fmt: skip
        elapsed = time.perf_counter() - started
        self._slice_ms.record(elapsed * 1000)
        metrics.TIME_SLICE_DURATION.observe(elapsed)
        return hits

    def search_vector(
        self, vec: np.ndarray, k: int, filters: Filter | Mapping[str, str] | None = None, *, with_vectors: bool = False
    ) -> list[Hit]:
        """search() for an already embedded query (unit norm, the embedder's dimension)."""
        self._require_started()
        k = validation.check_k(k, self.cfg.retrieval)
        chosen = as_filter(filters)
        q = np.asarray(vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.embedder.dim or not np.all(np.isfinite(q)):
            raise InvalidInput(f"vector must hold {self.embedder.dim} finite numbers")
        return self._search(q, k, chosen, with_vectors)

    def _search(self, q: np.ndarray, k: int, filters: Filter, with_vectors: bool) -> list[Hit]:
        store, state = self._require_started()
        try:
            return search_index(state, store, q, k, filters or None, with_vectors=with_vectors)
        except StoreError as exc:  # e.g. closed underneath a late search during shutdown
            raise Unavailable(f"the document store is unavailable: {exc}") from exc

    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        """(seq, doc_id, version, op) of every acknowledged change after `seq` (by any writer of a shared store)."""
        return self._require_started()[0].changes_since(seq)

    def last_change(self) -> int:
        return self._require_started()[0].max_seq()

    def searchable_changes(self, after_seq: int, upto_seq: int, *, limit: int = 512) -> list[ChangeRow]:
        """Changes in (after_seq, upto_seq] whose version is still current, seq order, at most `limit` (what
        Watch streams, with upto_seq <= applied_seq(); a version replaced since is skipped, as the index skipped
        or dropped it)."""
        store = self._require_started()[0]
        return store.current_changes(after_seq, min(upto_seq, self.applied_seq()), limit)

    def document_state(self, doc_id: str) -> DocState | None:
        return self._require_started()[0].current(doc_id)

    def count_matching(self, filters: Filter | Mapping[str, str]) -> tuple[int, int]:
        """(documents, chunks) in the index that `filters` selects (from the metadata index: no search)."""
        _, state = self._require_started()
        chosen = as_filter(filters)
        with state.lock.read():
            docs = state.meta.matching(chosen)
            return len(docs), sum(len(state.docmap.ids(d)) for d in docs)

    def live_metadata(self, doc_ids: Sequence[str], *, deleted_too: bool = False) -> dict[str, dict[str, str]]:
        """The acknowledged metadata of each live document among `doc_ids` (unknown ones are absent; deleted ones
        too unless `deleted_too`: then a tombstone's last metadata, {} once purged)."""
        return self._require_started()[0].live_metadata(doc_ids, deleted_too=deleted_too)

    def supersedes_of(self, doc_ids: Sequence[str]) -> dict[str, list[str]]:
        return self._require_started()[0].supersedes_of(doc_ids)

    def acked_seq(self) -> int:
        """The newest change acknowledged so far; searchable once applied_seq() reaches it."""
        self._require_started()
        return self._tracker.last()

    def applied_seq(self) -> int:
        """Every change up to this seq is in the index (in memory: cheap to poll)."""
        self._require_started()
        return self._tracker.watermark()

    @contextlib.contextmanager
    def applied_listener(self, listener: Callable[[], None]) -> Iterator[None]:
        """Call `listener` (on the worker thread; it must be quick) after each batch the index applies, while
        the block runs. For waiters that cannot block a thread, e.g. a coroutine woken via call_soon_threadsafe."""
        _, state = self._require_started()
        with state.applied:
            state.listeners.append(listener)
        try:
            yield
        finally:
            with state.applied:
                state.listeners.remove(listener)

    def wait_until_indexed(self, doc_id: str, version: int, timeout_s: float) -> bool:
        """True once `version` (or a newer one) of `doc_id` is applied to the index; False on timeout."""
        store, state = self._require_started()
        deadline = time.monotonic() + timeout_s

        def done() -> bool:
            # This replica's own index only: indexed_at in a shared store may be another replica's work.
            if state.docmap.version(doc_id) >= version:
                return True
            cur = store.current(doc_id)  # a delete is applied once the document is out of the index
            return cur is not None and cur.deleted and cur.version >= version and doc_id not in state.docmap

        with state.applied:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                state.applied.wait(min(left, 0.1))
        return True

    def stats(self) -> IndexStats:
        store, state = self._require_started()
        seq = store.max_seq()  # every change (from any replica) appends to the log: same seq, same counts
        cached = self._counts
        if cached is None or cached[0] != seq:
            cached = self._counts = (seq, store.counts(), store.history_counts())
        live, chunks, deleted = cached[1]
        timeline = self._timeline.stats() if self._timeline is not None else TimelineStats(0, 0, 0)
        history = HistoryStats(versions=cached[2][0], replaced_chunks=cached[2][1], memory_bytes=timeline.bytes,
                               slice_search=self._slice_ms.stats())  # fmt: skip
        return IndexStats(
            documents=live,
            chunks=chunks,
            deleted=deleted,
            pending=self._queue.in_use,
            indexed_vectors=state.index.ntotal,
            ingest_docs_per_s=self._ingest_rate.rate(),
            freshness=self._lags.stats(),
            embedder=self.embedder.name,
            index_kind=state.index.kind,
            history=history,
            index_detail=state.index.describe(),
            index_maintenance_pending=state.index.needs_maintenance(),
        )


def _write_error(exc: StoreError) -> Overloaded | Unavailable:
    """A full disk is RESOURCE_EXHAUSTED (retry once space is freed); any other store failure UNAVAILABLE."""
    if exc.full:
        return StorageFull(f"disk full: the document store could not commit ({exc}); nothing was acknowledged")
    return Unavailable(f"the document store could not commit: {exc}")
