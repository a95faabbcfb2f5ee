"""Several kfresh replicas over one shared store: what one acknowledges, the others serve, embedded once.

Two Indexers in one process share a store (a SQLite file, as two processes on one machine would, and a
real PostgreSQL server), each with its own FAISS index and snapshots; the follower tails the change log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from indexer_helper import CountingEmbedder

from kfresh.core.config import KfreshConfig
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer

MOON_1 = "The moon of Tarsis is called Velna and it is made of blue ice."
MOON_2 = "The moon of Tarsis is called Velna and it is made of red basalt since the impact."
RIVER = "The longest river of Oskaria is the Drem, flowing 900 km to the northern sea."


@pytest.fixture(scope="module")
def embedder(embedder_path):
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request, tmp_path) -> dict:
    """The store section both replicas use."""
    if request.param == "sqlite":
        return {"path": tmp_path / "shared.db"}
    return {"kind": "postgres", "dsn": request.getfixturevalue("pg_dsn")}


def replica_config(home: Path, store: dict, **replication) -> KfreshConfig:
    data = KfreshConfig().with_home(home).model_dump()
    data["store"].update(store)
    data["replication"].update({"follow": "on", "poll_s": 0.2, "takeover_s": 30.0, **replication})
    return KfreshConfig.model_validate(data)


@pytest.fixture
def replicas(tmp_path, shared_store, embedder) -> Iterator[Callable[..., Indexer]]:
    started: list[Indexer] = []

    def start(name: str, **replication) -> Indexer:
        ix = Indexer(replica_config(tmp_path / name, shared_store, **replication), embedder=CountingEmbedder(embedder))
        ix.start()
        started.append(ix)
        return ix

    yield start
    for ix in started:
        ix.close()


def until(cond: Callable[[], bool], timeout_s: float = 30.0) -> float:
    """Seconds until `cond()` held; fails the test on timeout."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def serves(ix: Indexer, query: str, doc_id: str, text: str) -> bool:
    return any(h.doc_id == doc_id and h.text == text for h in ix.search(query, 5))


def test_changes_acknowledged_by_one_replica_are_served_by_the_other(replicas):
    a, b = replicas("a"), replicas("b")
    a.upsert(DocumentIn("moon", MOON_1))
    until(lambda: serves(b, "What is the moon of Tarsis made of?", "moon", MOON_1))
    a.upsert(DocumentIn("moon", MOON_2))
    until(lambda: serves(b, "What is the moon of Tarsis made of?", "moon", MOON_2))
    assert not serves(b, "What is the moon of Tarsis made of?", "moon", MOON_1)  # the stale version is gone
    b.upsert(DocumentIn("river", RIVER))
    until(lambda: serves(a, "Which river is the longest in Oskaria?", "river", RIVER))
    a.delete("moon")
    until(lambda: all(h.doc_id != "moon" for h in b.search("moon of Tarsis", 5)))
    # Each change was embedded once, by the replica that acknowledged it.
    assert a.embedder.worker_encoded == [MOON_1, MOON_2] and b.embedder.worker_encoded == [RIVER]
    until(lambda: a.stats().indexed_vectors == b.stats().indexed_vectors == 1)  # hidden at once, removed just after


def test_a_change_its_owner_never_embeds_is_taken_over(replicas, shared_store, tmp_path):
    b = replicas("b", takeover_s=0.3)
    owner = Indexer(replica_config(tmp_path / "dead", shared_store), embedder=b.embedder)
    owner.start()
    owner._worker.stop(timeout_s=30)  # the owner acknowledges, then dies before embedding
    owner.upsert(DocumentIn("moon", MOON_1))
    waited = until(lambda: serves(b, "moon of Tarsis", "moon", MOON_1))
    assert waited >= 0.25 and b.embedder.worker_encoded == [MOON_1]
    owner.close()


def test_concurrent_writers_converge_on_the_same_index(replicas):
    a, b = replicas("a"), replicas("b")
    errors: list[BaseException] = []

    def write(ix: Indexer, tag: str) -> None:
        try:
            for i in range(12):
                ix.upsert(DocumentIn(f"shared-{i % 4}", f"Shared fact {i % 4} written by {tag} round {i}."))
                ix.upsert(DocumentIn(f"{tag}-{i}", f"Fact {i} known only to replica {tag}."))
                if i % 5 == 4:
                    ix.delete(f"{tag}-{i - 1}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(ix, tag)) for ix, tag in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = a._store
    live = {
        d: store.current(d) for d in [f"shared-{i}" for i in range(4)] + [f"{t}-{i}" for t in "ab" for i in range(12)]
    }
    want = {d: s.version for d, s in live.items() if s is not None and not s.deleted}

    def agrees(ix: Indexer) -> bool:
        return {d: ix._state.docmap.version(d) for d in live} == {d: want.get(d, 0) for d in live}

    until(lambda: agrees(a) and agrees(b))
    assert a.stats().indexed_vectors == b.stats().indexed_vectors == len(want)


def test_a_restarted_replica_catches_up_on_what_it_missed(replicas, shared_store, tmp_path, embedder):
    a = replicas("a")
    b = replicas("b")
    a.upsert(DocumentIn("moon", MOON_1))
    until(lambda: serves(b, "moon of Tarsis", "moon", MOON_1))
    b.close()  # writes its snapshot
    a.upsert(DocumentIn("moon", MOON_2))
    a.upsert(DocumentIn("river", RIVER))
    a.wait_until_indexed("river", 1, 60)
    b2 = replicas("b")  # same home: restores b's snapshot, then replays and follows the log
    until(lambda: serves(b2, "moon of Tarsis", "moon", MOON_2) and serves(b2, "longest river", "river", RIVER))
    assert b2.embedder.worker_encoded == []  # everything came with its owner's embeddings


@pytest.mark.slow
def test_two_server_processes_over_postgres(pg_dsn, tmp_path):
    """Two `kfresh serve` processes, one PostgreSQL: an Ingest on one is a Retrieve hit on the other."""
    from kfresh.client import document
    from kfresh.testing.servers import NO_GENERATION, client, kfresh_server
    from kfresh.v1 import kfresh_pb2 as pb

    shared = {**NO_GENERATION, "store.kind": "postgres", "store.dsn": pg_dsn, "replication.follow": "on"}
    for name in "ab":
        (tmp_path / name).mkdir()
    with (
        kfresh_server(shared, home=tmp_path / "a") as a,
        kfresh_server(shared, home=tmp_path / "b") as b,
        client(a.addr) as ca,
        client(b.addr) as cb,
    ):
        acks = list(ca.ingest([document("moon", MOON_1), document("river", RIVER)], timeout=30))
        assert [r.status for r in acks] == [pb.ACK_STATUS_STORED] * 2

        def on_b(query: str, doc_id: str) -> bool:
            return any(c.doc_id == doc_id for c in cb.retrieve(query, k=3, timeout=30).chunks)

        lag_s = until(lambda: on_b("What is the moon of Tarsis made of?", "moon"))
        until(lambda: on_b("longest river of Oskaria", "river"))
        ca.delete("moon")
        until(lambda: not on_b("What is the moon of Tarsis made of?", "moon"))
        assert cb.stats().documents == 1 and lag_s < 10
