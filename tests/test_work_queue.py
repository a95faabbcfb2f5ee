"""The indexing queue's micro-batching: how long a batch waits to fill, counted from the first change's enqueue."""

from __future__ import annotations

import threading
import time

from kfresh.indexer.queue import Pending, WorkQueue


def change(i: int) -> Pending:
    return Pending(doc_id=f"d{i}", version=1, op="upsert", seq=i, acked_at=time.time(), chunks=1)


def test_a_fresh_change_waits_for_company_up_to_max_wait():
    q = WorkQueue(16)
    q.put(change(1), reserved=False)
    threading.Timer(0.05, lambda: q.put(change(2), reserved=False)).start()
    batch = q.take(max_chunks=8, max_wait_s=2.0)
    # The batch is not full, so take() waits the whole 2 s from the first enqueue and collects the second.
    assert [p.doc_id for p in batch] == ["d1", "d2"]


def test_changes_that_queued_while_the_worker_was_busy_are_taken_without_waiting_again():
    q = WorkQueue(16)
    q.put(change(1), reserved=False)
    q.put(change(2), reserved=False)
    time.sleep(0.6)  # the worker was busy: both have waited longer than max_wait already
    started = time.monotonic()
    batch = q.take(max_chunks=8, max_wait_s=0.5)
    assert [p.doc_id for p in batch] == ["d1", "d2"]
    assert time.monotonic() - started < 0.3  # waiting from the take would have cost another 0.5 s


def test_a_full_batch_returns_at_once_and_leaves_the_rest_queued():
    q = WorkQueue(16)
    for i in range(5):
        q.put(change(i), reserved=False)
    assert [p.doc_id for p in q.take(max_chunks=3, max_wait_s=10.0)] == ["d0", "d1", "d2"]
    assert len(q) == 2
