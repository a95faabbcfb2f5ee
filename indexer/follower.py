"""Replicas over one shared store: tail its change log so changes another replica acknowledged reach this
replica's own vector index.

Each change is embedded once, by the replica that acknowledged it: a foreign upsert waits here until its
owner has stored the embeddings (then applying it is an index insert, no model call), unless it is still
unembedded after `takeover_s` (its owner may have died), when this replica embeds it. A foreign delete is
hidden from searches at once and removed from the index by the worker. Everything is idempotent by
(doc_id, version): a change the index already holds, or one superseded by a newer change, is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from kfresh.core.config import KfreshConfig, ReplicationConfig
from kfresh.indexer.queue import Pending, WorkQueue
from kfresh.indexer.rows import DocState
from kfresh.indexer.state import IndexState, SeqTracker

log = logging.getLogger("kfresh.indexer")

_WAITING_POLL_S = 0.02  # re-check foreign changes waiting for their owner's embeddings this often


class ChangeLog(Protocol):
    """The part of the document store the follower reads."""

    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]: ...

    def current(self, doc_id: str) -> DocState | None: ...

    def wait_for_change(self, after_seq: int, timeout_s: float) -> bool: ...


def follow_enabled(cfg: KfreshConfig) -> bool:
    """auto: follow whenever the store can be shared by several replicas (PostgreSQL)."""
    mode = cfg.replication.follow
    return mode == "on" or (mode == "auto" and cfg.store.kind == "postgres")


@dataclass
class _Foreign:
    seq: int
    doc_id: str
    version: int
    op: Literal["upsert", "delete"]


class ChangeFollower:
    """One daemon thread: change log -> foreign changes -> the worker's queue. Never exits early."""

    def __init__(
        self,
        *,
        store: ChangeLog,
        state: IndexState,
        queue: WorkQueue,
        tracker: SeqTracker,
        cfg: ReplicationConfig,
        after_seq: int,
    ) -> None:
        self.store = store
        self.state = state
        self.queue = queue
        self.tracker = tracker
        self.cfg = cfg
        self.seen = after_seq
        self.failures = 0
        self._waiting: list[_Foreign] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kfresh-follower", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        log.info("follower.started after_seq=%d", self.seen)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop; foreign changes not yet queued are re-read from the log at the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(self.cfg.poll_s if not self._waiting else _WAITING_POLL_S)
            except Exception:  # never die: a store hiccup is retried at the next turn
                self.failures += 1
                log.exception("follower.poll_failed seen=%d", self.seen)
                self._stop.wait(min(self.cfg.poll_s, 1.0))

    def poll(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for new changes, read them, queue those ready; returns how many queued."""
        self.store.wait_for_change(self.seen, timeout_s)
        for seq, doc_id, version, op in self.store.changes_since(self.seen):
            if self.tracker.claim_foreign(seq):
                self._waiting.append(_Foreign(seq, doc_id, version, "delete" if op == "delete" else "upsert"))
            self.seen = seq
        return self._dispatch()

    def _dispatch(self) -> int:
        still: list[_Foreign] = []
        queued = 0
        for item in self._waiting:
            verdict, cur = self._ready(item)
            if verdict == "skip":
                self.tracker.done([item.seq])
            elif verdict == "wait" or cur is None or not self._enqueue(item, cur.acked_at):
                still.append(item)
            else:
                queued += 1
        self._waiting = still
        return queued

    def _ready(self, item: _Foreign) -> tuple[Literal["skip", "wait", "go"], DocState | None]:
        cur = self.store.current(item.doc_id)
        if cur is None or cur.version != item.version:
            return "skip", cur  # a newer change of this document is further down the log
        if self.state.docmap.version(item.doc_id) >= item.version:
            return "skip", cur
        if item.op == "delete" or cur.indexed_at is not None:
            return "go", cur
        if time.time() - cur.acked_at < self.cfg.takeover_s:
            return "wait", cur  # its owner is embedding it; do not spend the model twice
        log.warning(
            "follower.takeover doc_id=%s version=%d: unembedded after %.1fs",
            item.doc_id,
            item.version,
            time.time() - cur.acked_at,
        )
        return "go", cur

    def _enqueue(self, item: _Foreign, acked_at: float) -> bool:
        if not self.queue.reserve(0.0):
            return False  # full: keep it waiting (the local ingest gets RESOURCE_EXHAUSTED meanwhile)
        if item.op == "delete":
            self.state.hide(item.doc_id, item.version)
        self.queue.put(Pending(item.doc_id, item.version, item.op, item.seq, acked_at, 1, foreign=True))
        return True
