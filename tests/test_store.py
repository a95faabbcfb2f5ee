"""The durable store, the same tests on each backend: a real SQLite file and a real PostgreSQL server.

Versions, idempotence, deletes, the worker's write-back, crash leftovers, waiting for a change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from kfresh.core.config import StoreConfig
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.stores import Applied, DocumentStore, StoreError, open_store
from kfresh.indexer.stores.sqlite import SqliteStore

DIM = 8
Opener = Callable[..., DocumentStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_backend(request, tmp_path) -> Iterator[Opener]:
    """Opens a store on one SQLite file / one PostgreSQL database; each call is another process's view of it."""
    if request.param == "sqlite":
        cfg = StoreConfig(path=tmp_path / "kfresh.db")
    else:
        cfg = StoreConfig(kind="postgres", dsn=request.getfixturevalue("pg_dsn"))
    opened: list[DocumentStore] = []

    def open_(**kwargs) -> DocumentStore:
        opened.append(open_store(cfg, **kwargs))
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_backend: Opener) -> DocumentStore:
    return open_backend()


def vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def apply(store: DocumentStore, doc_id: str, *, at: float = 1.0) -> np.ndarray:
    """What the worker does after a swap: save vectors for the current version, drop older rows."""
    cur = store.current(doc_id)
    rows = store.chunks_for(doc_id, cur.version)
    ids = np.array([r.chunk_id for r in rows], dtype=np.int64)
    v = None if cur.deleted else vecs(len(rows), seed=cur.version)
    store.save_applied([Applied(doc_id, cur.version, cur.deleted, at, 5.0, None if cur.deleted else ids, v)])
    return ids


def count(store: DocumentStore, table: str) -> int:
    """Rows in `table`, read through the backend's own connection (a test-only peek)."""
    if isinstance(store, SqliteStore):
        return store._r().execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    return store._fetchall(f"SELECT COUNT(*) FROM {table}")[0][0]


def test_durability_settings(store):
    w = store._w
    if isinstance(store, SqliteStore):
        assert w.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert w.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    else:  # COMMIT returns after the WAL flush, and the flush reaches the disk
        assert w.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert w.execute("SHOW fsync").fetchone()[0] == "on"


def test_upsert_versions_and_unchanged(store):
    doc = DocumentIn("a", "alpha text", source="s", metadata={"k": "v"})
    first = store.upsert(doc, ["alpha", "text"])
    assert (first.status, first.version, first.chunks) == ("stored", 1, 2)
    again = store.upsert(doc, ["alpha", "text"])
    assert (again.status, again.version, again.chunks, again.seq) == ("unchanged", 1, 2, first.seq)
    assert count(store, "changes") == 1 and count(store, "chunks") == 2

    # Every part of the content is in the hash: metadata alone makes a new version.
    meta = store.upsert(DocumentIn("a", "alpha text", source="s", metadata={"k": "w"}), ["alpha text"])
    assert (meta.status, meta.version) == ("stored", 2)
    for changed in (
        DocumentIn("a", "alpha text", source="t", metadata={"k": "w"}),
        DocumentIn("a", "alpha text", source="t", metadata={"k": "w"}, valid_from=5.0),
        DocumentIn("a", "alpha text", source="t", metadata={"k": "w"}, valid_from=5.0, supersedes=("b",)),
    ):
        assert store.upsert(changed, ["alpha text"]).status == "stored"
    assert store.current("a").version == 5


def test_old_chunks_stay_until_the_worker_applies_the_new_version(store):
    store.upsert(DocumentIn("a", "one", metadata={"v": "1"}), ["one"])
    v1_ids = apply(store, "a")
    store.upsert(DocumentIn("a", "two", metadata={"v": "2"}), ["two", "more"])
    # Before the swap: the old chunk still resolves, with ITS version's attributes, not the new one's.
    row = store.lookup(v1_ids.tolist())[int(v1_ids[0])]
    assert (row.version, row.metadata, row.text) == (1, {"v": "1"}, "one")
    assert [d.doc_id for d, _ in store.unembedded()] == ["a"]

    v2_ids = apply(store, "a", at=2.0)
    assert store.lookup(v1_ids.tolist()) == {}
    rows = store.lookup(v2_ids.tolist(), with_vectors=True)
    assert {r.version for r in rows.values()} == {2} and all(r.embedding.shape == (DIM,) for r in rows.values())
    assert store.unembedded() == []
    cur = store.current("a")
    assert cur.indexed_at == 2.0 and cur.version == 2


def test_delete_and_recreate_keep_versions_increasing(store):
    assert store.delete("nope").status == "not_found"
    store.upsert(DocumentIn("a", "one"), ["one"])
    apply(store, "a")
    gone = store.delete("a")
    assert (gone.status, gone.version) == ("deleted", 2)
    assert store.delete("a").status == "not_found"  # already deleted: no write
    assert count(store, "changes") == 2
    ids = [r.chunk_id for r in store.chunks_for("a", 1)]
    assert store.lookup(ids)[ids[0]].doc_deleted  # searches can drop it before the worker runs

    back = store.upsert(DocumentIn("a", "one"), ["one"])  # same content as before the delete: a new version
    assert (back.status, back.version) == ("stored", 3)
    assert store.counts() == (1, 1, 0)
    store.delete("a")
    apply(store, "a")
    assert count(store, "chunks") == 0 and store.counts() == (0, 0, 1)


def test_iter_embedded_and_changes(store):
    for i in range(5):
        store.upsert(DocumentIn(f"d{i}", f"text {i}"), [f"text {i}", "tail"])
    for i in range(3):
        apply(store, f"d{i}")
    store.delete("d0")
    got = [(d, v) for batch in store.iter_embedded(batch=2) for d, v in zip(batch[0], batch[1])]
    assert sorted(set(got)) == [("d1", 1), ("d2", 1)] and len(got) == 4
    assert store.docs_changed_since(5) == ["d0"]
    assert [c[3] for c in store.changes_since(0)] == ["upsert"] * 5 + ["delete"]
    assert store.max_seq() == 6
    assert sorted(d.doc_id for d, _ in store.unembedded()) == ["d3", "d4"]


def test_reopen_cleans_stale_rows_and_keeps_acks(open_backend):
    s = open_backend()
    s.upsert(DocumentIn("a", "one"), ["one"])
    s.upsert(DocumentIn("a", "two"), ["two"])  # v1 rows wait for a worker that never comes (crash)
    s.upsert(DocumentIn("b", "bee"), ["bee"])
    s.delete("b")
    s._w.close()  # no clean close: what a crash leaves
    s2 = open_backend()
    assert count(s2, "chunks") == 1 and s2.chunks_for("a", 2)[0].text == "two"
    assert s2.current("a").version == 2 and s2.current("b").deleted
    assert count(s2, "versions") == 1


def test_embedder_change_forgets_vectors(store):
    assert not store.ensure_embedder("m1", DIM)
    store.upsert(DocumentIn("a", "one"), ["one"])
    apply(store, "a")
    assert not store.ensure_embedder("m1", DIM)
    assert store.ensure_embedder("m2", DIM)
    assert [d.doc_id for d, _ in store.unembedded()] == ["a"]


def test_concurrent_writers_and_readers(store):
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for i in range(30):
                store.upsert(DocumentIn(f"t{t}", f"text {t} {i}"), [f"text {t} {i}"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(100):
                store.counts()
                store.current("t0")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)] + [threading.Thread(target=read)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(store.current(f"t{t}").version == 30 for t in range(4))
    assert store.max_seq() == 120


def test_closed_store_refuses_reads_and_closes_twice(open_backend):
    s = open_backend()
    s.counts()  # this thread has a reader connection now
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.current("a")
    with pytest.raises(StoreError):
        s.upsert(DocumentIn("a", "one"), ["one"])
    s.close()  # idempotent


def test_wait_for_change_wakes_at_another_writers_commit(open_backend):
    waiter, writer = open_backend(), open_backend()  # e.g. two replicas, or two processes on one file
    start = waiter.max_seq()
    t0 = time.monotonic()
    assert not waiter.wait_for_change(start, 0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    woke: list[tuple[bool, float]] = []

    def wait() -> None:
        woke.append((waiter.wait_for_change(start, 10), time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # the waiter is asleep by now
    ack = writer.upsert(DocumentIn("a", "one"), ["one"])
    acked = time.monotonic()
    thread.join(10)
    assert woke and woke[0][0] and woke[0][1] - acked < 0.25, (woke, acked)  # not its 10 s timeout
    assert waiter.wait_for_change(start, 0.0) and not waiter.wait_for_change(ack.seq, 0.05)


def test_write_many_is_one_transaction_in_order(store):
    from kfresh.indexer.documents import WriteOp

    store.upsert(DocumentIn("gone", "to be deleted"), ["to be deleted"])
    ops = [
        WriteOp("a", DocumentIn("a", "first"), ("first",)),
        WriteOp("a", DocumentIn("a", "second"), ("second",)),  # the same document twice: two versions, in order
        WriteOp("a", DocumentIn("a", "second"), ("second",)),  # identical to the one before: unchanged
        WriteOp("gone"),
        WriteOp("never-there"),
        WriteOp("b", DocumentIn("b", "bee"), ("bee",)),
    ]
    acks = store.write_many(ops)
    assert [(a.id, a.version, a.status) for a in acks] == [
        ("a", 1, "stored"),
        ("a", 2, "stored"),
        ("a", 2, "unchanged"),
        ("gone", 2, "deleted"),
        ("never-there", 0, "not_found"),
        ("b", 1, "stored"),
    ]
    seqs = [a.seq for a in acks if a.status in ("stored", "deleted")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4  # one change-log entry each, in op order
    assert store.current("a").version == 2 and store.current("gone").deleted
    assert store.write_many([]) == []


def test_write_many_failing_midway_commits_nothing(store, monkeypatch):
    from kfresh.indexer.documents import WriteOp
    from kfresh.indexer.stores import pg_writes, sqlite_writes

    writes = sqlite_writes if isinstance(store, SqliteStore) else pg_writes
    real, calls = writes.upsert, []

    def fail_third(*args, **kwargs):  # fault injection: the transaction dies after two writes
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure inside the group commit")
        return real(*args, **kwargs)

    monkeypatch.setattr(writes, "upsert", fail_third)
    ops = [WriteOp(f"g{i}", DocumentIn(f"g{i}", f"text {i}"), (f"text {i}",)) for i in range(4)]
    with pytest.raises(RuntimeError, match="injected"):
        store.write_many(ops)
    monkeypatch.setattr(writes, "upsert", real)
    assert all(store.current(f"g{i}") is None for i in range(4))  # nothing acknowledged, nothing committed
    assert [a.status for a in store.write_many(ops)] == ["stored"] * 4  # the writer connection still works


@pytest.mark.parametrize("durable", [True, False])
def test_bulk_load_leaves_the_rows_upsert_and_save_applied_leave(tmp_path, durable):
    """benchmarks/preload.py builds its corpora through bulk_load: same tables as the ingest path, row for row."""
    import sqlite3

    docs = [
        (DocumentIn("a", "one. two.", source="s", metadata={"k": "v"}, valid_from=5.0), ["one.", "two."]),
        (DocumentIn("b", "three.", supersedes=("a",)), ["three."]),
        (DocumentIn("c", "", source="empty"), []),
    ]
    vectors = {doc.id: vecs(len(chunks), seed=i) for i, (doc, chunks) in enumerate(docs)}
    with SqliteStore(tmp_path / "ingest.db") as by_ingest:
        for doc, chunks in docs:
            by_ingest.upsert(doc, chunks, now=100.0)
            rows = by_ingest.chunks_for(doc.id, 1)
            ids = np.array([r.chunk_id for r in rows], dtype=np.int64)
            by_ingest.save_applied([Applied(doc.id, 1, False, 100.0, 0.0, ids, vectors[doc.id])])
    with SqliteStore(tmp_path / "bulk.db") as by_bulk:
        assert by_bulk.bulk_load(((d, c, vectors[d.id]) for d, c in docs), now=100.0, batch=2, durable=durable) == 3
        with pytest.raises(StoreError):  # an id already stored fails its batch
            by_bulk.bulk_load([(docs[0][0], docs[0][1], vectors["a"])], now=100.0)

    def dump(path):
        with sqlite3.connect(path) as db:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}

    assert dump(tmp_path / "bulk.db") == dump(tmp_path / "ingest.db")
