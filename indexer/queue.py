"""Bounded queue of acknowledged-but-not-yet-searchable changes, with slots reserved before the ack.

A client reserves a slot first (waiting a bounded time), then commits, then enqueues into its slot; so a
change is never acknowledged without room to index it. Slots are freed when the worker has applied them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Pending:
    """One acknowledged change for the worker."""

    doc_id: str
    version: int
    op: Literal["upsert", "delete"]
    seq: int
    acked_at: float
    chunks: int = 0
    recovered: bool = False  # enqueued by start(), not by a client
    foreign: bool = False  # acknowledged by another replica sharing the store (see follower.py)
    attempts: int = 0


class WorkQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[float, Pending]] = deque()  # (monotonic enqueue time, change)
        self._used = 0  # reserved + queued + being applied
        self._cond = threading.Condition()
        self._closed = False

    @property
    def in_use(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def reserve(self, timeout_s: float) -> bool:
        """Take a slot, waiting at most `timeout_s`; False if the queue stayed full."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._used >= self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            self._used += 1
            return True

    def reserve_up_to(self, n: int, timeout_s: float) -> int:
        """Take up to `n` slots: waits at most `timeout_s` for the first, takes the others only if free now.
        Returns how many were taken (0 if the queue stayed full)."""
        if n <= 0 or not self.reserve(timeout_s):
            return 0
        with self._cond:
            extra = max(0, min(n - 1, self.capacity - self._used))
            self._used += extra
        return 1 + extra

    def unreserve(self) -> None:
        """Give back a reserved slot that was not used (the change was a no-op or failed)."""
        self.release(1)

    def put(self, item: Pending, *, reserved: bool = True) -> None:
        """Enqueue into a reserved slot; recovery passes reserved=False and may exceed the capacity."""
        with self._cond:
            if not reserved:
                self._used += 1
            self._items.append((time.monotonic(), item))
            self._cond.notify_all()

    def take(self, *, max_chunks: int, max_wait_s: float, poll_s: float = 0.2) -> list[Pending]:
        """A micro-batch: waits up to `poll_s` for a first item, then fills the batch until `max_wait_s` after
        that item was queued. The wait counts from the enqueue, not from this call: items that queued up
        while the worker was busy have waited already, and waiting again would only add to their lag."""
        with self._cond:
            if not self._items:
                self._cond.wait(poll_s)
            if not self._items:
                return []
            queued_at, first = self._items.popleft()
            batch = [first]
            chunks = max(first.chunks, 1)
            deadline = queued_at + max_wait_s
            while chunks < max_chunks:
                if self._items:
                    item = self._items.popleft()[1]
                    batch.append(item)
                    chunks += max(item.chunks, 1)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def release(self, n: int) -> None:
        """Free `n` slots once their changes are applied (or skipped as superseded)."""
        with self._cond:
            self._used = max(0, self._used - n)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
