"""The in-memory side of the index shared by searches and the worker, and the applied-sequence watermark."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kfresh.indexer.docmap import DocMap
from kfresh.indexer.metaindex import MetaIndex
from kfresh.indexer.rwlock import RWLock
from kfresh.indexer.vectors import VectorIndex

log = logging.getLogger("kfresh.indexer")


@dataclass
class IndexState:
    """Everything a search must see consistently. `lock` guards index, docmap, meta and unsaved together.

    hidden: doc_id -> version of an acknowledged delete; chunks of older versions are invisible to searches
    until the worker has removed them. unsaved: vectors made searchable whose store write may still be in
    flight (with_vectors falls back to them); replaced at the next swap.
    """

    index: VectorIndex
    docmap: DocMap
    meta: MetaIndex = field(default_factory=MetaIndex)  # the indexed versions' metadata, for filter planning
    lock: RWLock = field(default_factory=RWLock)
    hidden: dict[str, int] = field(default_factory=dict)
    hidden_lock: threading.Lock = field(default_factory=threading.Lock)
    unsaved: dict[int, np.ndarray] = field(default_factory=dict)
    applied: threading.Condition = field(default_factory=threading.Condition)
    listeners: list[Callable[[], None]] = field(
        default_factory=list
    )  # called after each applied batch; under `applied`

    def hide(self, doc_id: str, version: int) -> None:
        with self.hidden_lock:
            self.hidden[doc_id] = max(version, self.hidden.get(doc_id, 0))

    def unhide_upto(self, doc_id: str, version: int) -> None:
        """The index no longer holds any chunk of `doc_id` older than `version`."""
        with self.hidden_lock:
            if self.hidden.get(doc_id, version + 1) <= version:
                del self.hidden[doc_id]

    def hidden_copy(self) -> dict[str, int]:
        with self.hidden_lock:
            return dict(self.hidden)

    def notify_applied(self) -> None:
        """Wake threads waiting on `applied`, then call the listeners (on the worker thread: they must be quick)."""
        with self.applied:
            self.applied.notify_all()
            listeners = tuple(self.listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener must not fail a batch that is already applied
                log.exception("indexer.listener_failed")


class SeqTracker:
    """Which change sequence numbers are durably acked but not yet in the index.

    `lock` is held around each store commit and its registration, so at any instant every committed seq is
    either registered pending or applied. The watermark (every seq <= it is in the index) is then exact.

    With `follow` (replicas sharing one store), other replicas commit seqs too. The change follower claims
    them in log order; the watermark never passes the follower's horizon (the last seq it has read), so a
    snapshot never claims a foreign change it has not applied. Own seqs are remembered until the follower
    passes them, so it does not queue them a second time.
    """

    def __init__(self, last_committed: int, *, follow: bool = False) -> None:
        self.lock = threading.Lock()
        self._last = last_committed
        self._pending: Counter[int] = Counter()
        self._follow = follow
        self._mine: set[int] = set()
        self._horizon = last_committed

    def register(self, seq: int) -> None:
        """Call with `lock` held, right after the commit that produced `seq`."""
        self._pending[seq] += 1
        self._last = max(self._last, seq)
        if self._follow:
            self._mine.add(seq)

    def register_recovered(self, seq: int) -> None:
        with self.lock:
            self.register(seq)

    def claim_foreign(self, seq: int) -> bool:
        """The follower read `seq` from the log: True (and pending) if another replica committed it."""
        with self.lock:
            self._horizon = max(self._horizon, seq)
            if seq in self._mine:
                self._mine.discard(seq)
                return False
            self._pending[seq] += 1
            self._last = max(self._last, seq)
            return True

    def done(self, seqs: list[int]) -> None:
        with self.lock:
            for seq in seqs:
                self._pending[seq] -= 1
                if self._pending[seq] <= 0:
                    del self._pending[seq]

    def last(self) -> int:
        """The newest seq registered (acknowledged here, or claimed from another replica)."""
        with self.lock:
            return self._last

    def watermark(self) -> int:
        with self.lock:
            mark = min(self._pending) - 1 if self._pending else self._last
            return min(mark, self._horizon) if self._follow else mark
