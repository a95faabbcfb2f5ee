"""History (issue 19, item 1): every acknowledged version is kept with both timelines, in SQLite and PostgreSQL
alike, and the "as of" / "valid at" slices of the in-memory history (indexer/timeline.py), refreshed from the
store at random points of the history, match a small pure-Python model of random histories of upserts,
supersedes, deletes and purges, for random times (hypothesis); its search is the exact top k of the slice.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kfresh.indexer.documents import DocumentIn, WriteOp
from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import Applied
from kfresh.indexer.stores.postgres import PostgresStore
from kfresh.indexer.stores.sqlite import SqliteStore
from kfresh.indexer.timeline import Timeline

DOCS = "abc"
_run = itertools.count()

op = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(DOCS), st.integers(0, 40), st.sets(st.sampled_from(DOCS))),
    st.tuples(st.just("delete"), st.sampled_from(DOCS), st.just(0), st.just(frozenset())),
    st.tuples(st.just("purge"), st.sampled_from(DOCS), st.just(0), st.just(frozenset())),
)


@dataclass
class Version:
    doc: str
    version: int
    valid_from: float
    supersedes: tuple[str, ...]
    acked: float
    ended: float | None = None
    ended_by: str | None = None


@dataclass
class Model:
    """The two timelines replayed from the operations, written without the store's tables or the timeline."""

    versions: dict[str, list[Version]] = field(default_factory=dict)
    counter: dict[str, int] = field(default_factory=dict)  # the store's version number (a delete takes one too)
    live: dict[str, bool] = field(default_factory=dict)

    def apply(self, kind: str, doc: str, t: float, valid_from: float, supersedes: tuple[str, ...]) -> None:
        mine = self.versions.setdefault(doc, [])
        if kind == "upsert":
            if mine and mine[-1].ended is None:
                mine[-1].ended, mine[-1].ended_by = t, "upsert"
            self.counter[doc] = self.counter.get(doc, 0) + 1
            mine.append(Version(doc, self.counter[doc], valid_from, supersedes, t))
            self.live[doc] = True
            return
        if self.live.get(doc):
            self.counter[doc] += 1
            if mine and mine[-1].ended is None:
                mine[-1].ended, mine[-1].ended_by = t, "delete"
            self.live[doc] = False
        if kind == "purge":
            self.versions[doc] = []

    def as_of(self, s: float) -> set[tuple[str, int]]:
        """Replay: the version each document had at system time s."""
        return {(v.doc, v.version) for vs in self.versions.values() for v in vs
                if v.acked <= s and (v.ended is None or v.ended > s)}  # fmt: skip

    def valid_at(self, w: float, s: float = math.inf) -> set[tuple[str, int]]:
        true: list[Version] = []
        for vs in self.versions.values():
            known = [v for v in vs if v.acked <= s]
            for v, nxt in itertools.zip_longest(known, known[1:]):
                if nxt is not None:
                    end = nxt.valid_from
                else:
                    end = v.ended if v.ended is not None and v.ended <= s and v.ended_by == "delete" else math.inf
                if v.valid_from <= w < end:
                    true.append(v)
        gone = {d for v in true for d in v.supersedes}
        return {(v.doc, v.version) for v in true if v.doc not in gone}


def _replay(store: Any, ops: list[tuple[str, str, int, frozenset[str]]], prefix: str, timeline: Timeline,
            embedder: Any, refresh_at: set[int]) -> Model:  # fmt: skip
    model = Model()
    for i, (kind, doc, vf, sup) in enumerate(ops):
        t, doc_id = 1000.0 + 10 * i, prefix + doc
        supersedes = tuple(sorted(prefix + d for d in sup if d != doc))
        if kind == "upsert":
            valid_from = 500.0 + 10 * vf
            text = f"{doc} says {i}"
            store.write_many([WriteOp(doc_id, DocumentIn(doc_id, text, valid_from=valid_from, supersedes=supersedes),
                                      (text,))], now=t)  # fmt: skip
        else:
            store.write_many([WriteOp(doc_id)], now=t)
            if kind == "purge" and store.current(doc_id) is not None:
                store.erase(doc_id)
            valid_from = 0.0
        model.apply(kind, doc_id, t, valid_from, supersedes)
        if i in refresh_at:  # the in-memory copy catches up part way, as a search between writes would make it
            timeline.refresh(store, embedder)
    return model


def _check(store: Any, embedder: Any, ops: list[tuple[str, str, int, frozenset[str]]], times: list[int],
           refresh_at: set[int], prefix: str) -> None:  # fmt: skip
    timeline = Timeline(embedder.dim)
    if prefix:  # a shared PostgreSQL database: other examples' documents are in the copy too
        timeline.refresh(store, embedder)
    model = _replay(store, ops, prefix, timeline, embedder, refresh_at)
    rows = [r for r in store.history_rows() if r.doc_id.startswith(prefix)]
    expected = sorted((v.doc, v.version, v.valid_from, v.supersedes, v.acked, v.ended, v.ended_by)
                      for vs in model.versions.values() for v in vs)  # fmt: skip
    assert sorted((r.doc_id, r.version, r.valid_from, r.supersedes, r.acked_at, r.ended_at, r.ended_by)
                  for r in rows) == expected  # fmt: skip
    timeline.refresh(store, embedder)

    def key(**when: float) -> set[tuple[str, int]]:
        return {(r.doc_id, r.version) for r in timeline.versions(**when) if r.doc_id.startswith(prefix)}

    for t in times:
        s, w = 995.0 + 5 * t, 495.0 + 5 * t  # between and on the operations' times and valid_froms
        assert key(as_of=s) == model.as_of(s), ("as_of", s)
        assert key(valid_at=w) == model.valid_at(w), ("valid_at", w)
        assert key(as_of=s, valid_at=w) == model.valid_at(w, s), ("both", s, w)
    assert key() == model.as_of(math.inf)  # now = the live documents
    if not prefix:  # the search: the exact top k of the slice's chunks by the embedder's scores
        s = 995.0 + 5 * times[0]
        q = embedder.encode(["what does b say"])[0]
        chunks = store.slice_chunks([r for r in rows if (r.doc_id, r.version) in model.as_of(s)])
        scores = embedder.encode([c.text for _, c in chunks]) @ q
        exact = [(chunks[i][0].doc_id, chunks[i][0].version) for i in np.argsort(-scores, kind="stable")[:3]]
        hits = timeline.search(q, 3, Filter(), as_of=s, valid_at=None)
        assert [(h.row.doc_id, h.row.version) for h in hits] == exact


ops_lists = st.lists(op, min_size=1, max_size=14)
times_lists = st.lists(st.integers(0, 40), min_size=1, max_size=6)
refresh_sets = st.sets(st.integers(0, 13), max_size=4)


@pytest.fixture(scope="module")
def embedder(embedder_path: str) -> Any:
    from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(embedder_path, device="cpu")


UPSERT_A, UPSERT_B_OVER_A = ("upsert", "a", 0, frozenset()), ("upsert", "b", 0, frozenset({"a"}))
DELETE_A, PURGE_A = ("delete", "a", 0, frozenset()), ("purge", "a", 0, frozenset())


@settings(max_examples=60, deadline=None)
@given(ops=ops_lists, times=times_lists, refresh_at=refresh_sets)
@example(ops=[UPSERT_A, UPSERT_B_OVER_A], times=[2], refresh_at=set())  # b supersedes a while both are true
@example(ops=[UPSERT_A, DELETE_A, PURGE_A], times=[2], refresh_at={1})  # a purge with no change of its own
def test_sqlite_history_matches_the_model(
    embedder: Any, ops: list[Any], times: list[int], refresh_at: set[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp, SqliteStore(Path(tmp) / "k.db") as store:
        _check(store, embedder, ops, times, refresh_at, "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_lists, times=times_lists, refresh_at=refresh_sets)
def test_postgres_history_matches_the_model(pg_dsn: str, embedder: Any, ops: list[Any], times: list[int],
                                            refresh_at: set[int]) -> None:  # fmt: skip
    with PostgresStore(pg_dsn) as store:
        _check(store, embedder, ops, times, refresh_at, f"h{next(_run)}-")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_replaced_version_keeps_its_chunks_and_a_purge_erases_them(kind: str, tmp_path: Path, request: Any) -> None:
    store = SqliteStore(tmp_path / "k.db") if kind == "sqlite" else PostgresStore(request.getfixturevalue("pg_dsn"))
    with store:
        doc = f"kept-{kind}-{next(_run)}"
        store.write_many([WriteOp(doc, DocumentIn(doc, "one two"), ("one", "two"))], now=1000.0)
        store.write_many([WriteOp(doc, DocumentIn(doc, "three"), ("three",))], now=1010.0)
        store.save_applied([Applied(doc, 2, False, 1011.0, 1.0)])  # the worker swapped v2 in: v1's rows go
        assert [r.text for r in store.chunks_for(doc, 1)] == []
        rows = store._fetchall(f"SELECT version, ordinal, text FROM history_chunks WHERE doc_id={store._p}", (doc,))
        assert sorted(rows) == [(1, 0, "one"), (1, 1, "two")]
        (v1, v2) = [r for r in store.history_rows() if r.doc_id == doc]
        assert (v1.ended_at, v1.ended_by, v2.ended_at) == (1010.0, "upsert", None)
        store.delete(doc, now=1020.0)
        erased = store.erase(doc)
        assert erased is not None and erased.versions == 2 and erased.chunks >= 2
        assert [r for r in store.history_rows() if r.doc_id == doc] == []
        assert store._fetchall(f"SELECT 1 FROM history_chunks WHERE doc_id={store._p}", (doc,)) == []


@pytest.fixture(scope="module")
def server(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from server_helper import ServerHandle, server_config

    handle = ServerHandle(engine_loop, server_config(tmp_path_factory.mktemp("history")), vllm_backend)
    yield handle
    handle.stop()


@pytest.mark.slow
def test_retrieve_and_answer_as_of_and_valid_at_over_a_live_server(server: Any) -> None:
    import time

    from server_helper import answer_once

    from kfresh.client import KfreshClient, document
    from kfresh.core.time import from_timestamp

    day1 = 1_790_000_000.0
    with KfreshClient(f"127.0.0.1:{server.port}") as client:
        client.wait_ready(timeout=120)
        first = "Jonas Vell was elected mayor of Port Avel on election night."
        list(client.ingest([document("mayor", first, source="day1", valid_from=day1)], timeout=30))
        assert client.wait_searchable(30).searchable
        between = time.time()
        time.sleep(0.05)
        fixed = "After the recount, Ilka Sarn is the mayor of Port Avel, not Jonas Vell."
        list(client.ingest([document("mayor", fixed, source="day2", valid_from=day1 + 86_400)], timeout=30))
        assert client.wait_searchable(30).searchable

        def versions(**when: float) -> list[tuple[str, int]]:
            return [(c.doc_id, c.version) for c in client.retrieve("mayor of Port Avel", k=3, **when).chunks]

        assert versions() == [("mayor", 2)]
        assert versions(as_of=between) == [("mayor", 1)]  # the knowledge base as it stood then
        assert versions(as_of=day1) == []  # before anything was acknowledged
        assert versions(valid_at=day1 + 3_600) == [("mayor", 1)]  # what was true on day 1, as known now
        assert versions(valid_at=day1 + 2 * 86_400) == [("mayor", 2)]
        history = client.stats().history  # item 5: the history's size and the time-slice searches' latency
        assert history.versions >= 2 and history.replaced_chunks >= 1 and history.memory_bytes > 0
        assert history.slice_search.count >= 4 and history.slice_search.p50_ms > 0
        assert versions(valid_at=day1 - 1) == []
        from kfresh.client.langchain import KfreshRetriever

        then = KfreshRetriever(addr=f"127.0.0.1:{server.port}", k=1, as_of=between).invoke("mayor of Port Avel")
        assert [(d.metadata["doc_id"], d.metadata["version"]) for d in then] == [("mayor", 1)]
        assert "acked_at" in then[0].metadata
        old = client.retrieve("mayor of Port Avel", k=1, as_of=between).chunks[0]
        assert old.text == first and abs(from_timestamp(old.acked_at) - between) < 5

        text, done = answer_once(client, "Who was the mayor of Port Avel?", valid_at=day1 + 3_600)
        assert [(c.doc_id, c.version) for c in done.citations] == [("mayor", 1)] and "Jonas" in text
        assert from_timestamp(done.citations[0].acked_at) <= between

        client.delete("mayor")
        deleted_at = time.time()
        assert versions() == [] and versions(as_of=deleted_at - 0.01) == [("mayor", 2)]
        assert versions(valid_at=day1 + 3_600) == [("mayor", 1)]  # the delete ends only the last version


def test_the_timeline_scores_vectors_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from kfresh.indexer import timeline

    monkeypatch.setattr(timeline._Vectors, "BLOCK", 4)
    rng = np.random.default_rng(3)
    vectors, q = rng.standard_normal((11, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    held = timeline._Vectors(5)
    held.append(vectors[:3])
    held.append(vectors[3:])  # fills the first block's last row, a whole block, and part of a third
    assert held.n == 11 and held.nbytes == 11 * 5 * 4
    np.testing.assert_allclose(held.scores(q), vectors @ q, rtol=1e-6)
    rows = np.array([0, 3, 4, 9, 10])
    np.testing.assert_allclose(held.scores(q, rows), vectors[rows] @ q, rtol=1e-6)
    np.testing.assert_array_equal(held.row(9), vectors[9])
