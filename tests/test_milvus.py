"""The milvus vector backend against real milvus-lite: exactness against numpy brute force, upsert/delete
semantics, snapshots as manifests, and the Indexer end to end with index.kind="milvus".

Every test gets its own milvus-lite file under tmp_path. Skipped only when milvus-lite cannot be imported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install -r requirements.txt)")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -r requirements.txt)")

from indexer_helper import CountingEmbedder
from test_indexer import FACTS, config, ingest
from test_vectors import DIM, K, clustered, exact, recall

from kfresh.core.config import IndexConfig, KfreshConfig
from kfresh.core.errors import Unavailable
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer
from kfresh.indexer.snapshot import snapshot_path
from kfresh.indexer.vectors import create_index, index_from_bytes
from kfresh.indexer.vectors.milvus import MilvusIndex

N = 3_000  # enough for several flushed segments plus unsealed rows; milvus-lite upserts ~10k vectors/s here


def milvus_config(tmp_path: Path, **fields) -> IndexConfig:
    return IndexConfig(kind="milvus", milvus_uri=str(tmp_path / "milvus.db"), **fields)


@pytest.fixture
def index(tmp_path):
    ix = create_index(milvus_config(tmp_path, milvus_flush_rows=1_000), DIM)
    yield ix
    ix.close()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.arange(50_000, 50_000 + N, dtype=np.int64)  # chunk ids, not positions
    return ids, clustered(N, seed=11), clustered(40, seed=12)


def assert_exact(index: MilvusIndex, ids: np.ndarray, base: np.ndarray, queries: np.ndarray) -> None:
    """Top-k ids match numpy brute force (ties aside) and so do the scores, best first."""
    scores, found = index.search(queries, K)
    assert found.shape == scores.shape == (len(queries), K)
    assert recall(found, exact(ids, base, queries), base, ids, queries) == 1.0
    truth = -np.sort(-(queries @ base.T), axis=1)[:, :K]
    assert np.allclose(scores, truth, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_search_is_exact_through_adds_removes_and_maintenance(index, data):
    ids, base, queries = data
    index.add(ids[:2_000], base[:2_000])
    assert index.needs_maintenance()  # 2,000 written rows > milvus_flush_rows
    index.maintain()
    assert not index.needs_maintenance()
    index.add(ids[2_000:], base[2_000:])  # these stay unsealed: the search must merge both kinds of rows
    assert index.ntotal == N
    assert_exact(index, ids, base, queries)

    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0  # already gone
    keep = np.ones(N, dtype=bool)
    keep[::3] = False
    assert index.ntotal == keep.sum()
    assert not set(index.search(queries, K)[1].ravel().tolist()) & set(gone.tolist())
    assert_exact(index, ids[keep], base[keep], queries)


def test_readd_is_idempotent_and_replaces_the_vector(index, data):
    ids, base, queries = data
    index.add(ids[:500], base[:500])
    index.add(ids[:500], base[:500])  # a rebuild, or a second replica, re-adds the same vectors
    assert index.ntotal == 500
    assert_exact(index, ids[:500], base[:500], queries)
    index.add(ids[:1], base[600:601])  # same id, new vector: the old one is gone
    scores, found = index.search(base[600:601], 2)
    assert found[0, 0] == ids[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    scores, found = index.search(base[:1], 500)  # the old vector no longer scores 1 under ids[0]
    assert scores[0, found[0].tolist().index(ids[0])] == pytest.approx(float(base[0] @ base[600]), abs=1e-5)
    assert index.ntotal == 500


def test_remove_counts_only_ids_that_were_there(index, data):
    ids, base, _ = data
    index.add(ids[:100], base[:100])
    assert index.remove(np.array([], dtype=np.int64)) == 0
    assert index.remove(np.array([1, 2, 3])) == 0  # never added
    mixed = np.array([ids[0], ids[0], ids[1], 7, ids[2], 10**15])  # duplicates and unknown ids
    assert index.remove(mixed) == 3
    assert index.ntotal == 97


def test_missing_results_are_padded_and_k_beyond_ntotal_is_fine(index):
    scores, found = index.search(clustered(2, seed=3), 5)
    assert found.shape == (2, 5) and (found == -1).all() and np.isneginf(scores).all()
    index.add(np.array([7, 8]), clustered(2, seed=4))
    scores, found = index.search(clustered(1, seed=5), 5)
    assert sorted(found[0, :2].tolist()) == [7, 8] and (found[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    assert index.search(clustered(1, seed=5), 0)[1].shape == (1, 0)


def test_a_just_added_vector_is_found_by_the_next_search(index, data):
    ids, base, _ = data
    index.add(ids[:1_000], base[:1_000])
    index.maintain()
    fresh = clustered(30, seed=13)
    for j, vec in enumerate(fresh):
        index.add(np.array([10**9 + j]), vec[None])
        assert index.search(vec[None], 1)[1][0, 0] == 10**9 + j  # no retry: Strong consistency
    for j, vec in enumerate(fresh[:10]):
        assert index.remove(np.array([10**9 + j])) == 1
        assert index.search(vec[None], 1)[1][0, 0] != 10**9 + j


def test_snapshot_is_a_manifest_and_reconnects_to_the_same_vectors(tmp_path, data):
    ids, base, queries = data
    cfg = milvus_config(tmp_path)
    first = create_index(cfg, DIM)
    first.add(ids, base)
    manifest = first.to_bytes()
    assert len(manifest) < 300 and b"milvus.db" in manifest  # the vectors stay in Milvus
    second = index_from_bytes(cfg, DIM, manifest)
    assert second.ntotal == N and np.array_equal(second.search(queries, K)[1], first.search(queries, K)[1])
    second.close()
    first.close()  # the last user of the file: milvus-lite stops; reopening reads it back from disk
    reopened = index_from_bytes(cfg, DIM, manifest)
    try:
        assert reopened.ntotal == N
        assert_exact(reopened, ids, base, queries)
    finally:
        reopened.close()


def test_a_manifest_for_another_collection_or_dim_is_refused(tmp_path):
    cfg = milvus_config(tmp_path)
    made = create_index(cfg, DIM)
    manifest = made.to_bytes()
    made.close()
    for other, dim in ((cfg.model_copy(update={"milvus_collection": "other"}), DIM), (cfg, DIM + 1),
                       (cfg.model_copy(update={"milvus_uri": str(tmp_path / "elsewhere.db")}), DIM)):  # fmt: skip
        with pytest.raises(ValueError):
            index_from_bytes(other, dim, manifest)
    with pytest.raises(ValueError, match="manifest"):
        index_from_bytes(cfg, DIM, b"\x00not json")


def test_a_collection_of_another_dimension_is_an_actionable_error(tmp_path):
    cfg = milvus_config(tmp_path)
    create_index(cfg, DIM).close()
    with pytest.raises(ValueError, match="milvus_collection"):
        create_index(cfg, DIM * 2)


@pytest.mark.parametrize(("index_type", "params"), [("HNSW", {"milvus_hnsw_ef": 64}),
                                                    ("IVF_FLAT", {"milvus_nlist": 16, "milvus_nprobe": 8})])  # fmt: skip
def test_approximate_index_types_keep_recall_high(tmp_path, data, index_type, params):
    ids, base, queries = data
    ix = create_index(milvus_config(tmp_path, milvus_index_type=index_type, **params), DIM)
    try:
        ix.add(ids, base)
        ix.maintain()
        assert ix.index_type == index_type
        measured = recall(ix.search(queries, K)[1], exact(ids, base, queries), base, ids, queries)
        assert measured >= 0.9, f"{index_type} recall@10 {measured:.3f}"
    finally:
        ix.close()


def test_a_milvus_that_went_away_is_unavailable_not_an_internal_error(tmp_path):
    from milvus_lite.server_manager import server_manager_instance

    cfg = milvus_config(tmp_path, milvus_timeout_s=5)
    ix = create_index(cfg, DIM)
    try:
        ix.add(np.array([1]), clustered(1, seed=6))
        server_manager_instance.release_server(cfg.milvus_uri)  # what a crashed server looks like to pymilvus
        with pytest.raises(Unavailable, match="could not search"):
            ix.search(clustered(1, seed=6), 1)
    finally:
        ix.close()


def test_config_validates_the_uri_and_with_home_moves_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="milvus_uri"):
        IndexConfig(kind="milvus", milvus_uri="milvus.sqlite")
    assert IndexConfig(milvus_uri="http://milvus:19530").milvus_uri == "http://milvus:19530"
    assert KfreshConfig().with_home(tmp_path).index.milvus_uri == str(tmp_path / "milvus.db")
    remote = KfreshConfig(index=IndexConfig(milvus_uri="https://milvus.example:443"))
    assert remote.with_home(tmp_path).index.milvus_uri == "https://milvus.example:443"


# -- the Indexer with index.kind="milvus" ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(embedder_path):
    """The real packaged all-MiniLM-L6-v2, loaded once per module."""
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


def milvus_indexer_config(home: Path) -> KfreshConfig:
    return config(home, index={"kind": "milvus", "milvus_flush_rows": 4})


def test_indexer_on_milvus_acks_replaces_deletes_filters_and_restarts(tmp_path, embedder, caplog):
    cfg = milvus_indexer_config(tmp_path)
    assert cfg.index.milvus_uri == str(tmp_path / "milvus.db")
    with Indexer(cfg, embedder=embedder) as ix:
        started = time.perf_counter()
        ack = ix.upsert(DocumentIn("moon", FACTS["moon"], metadata={"lang": "en"}))
        assert ix.wait_until_indexed("moon", ack.version, 60)
        assert ix.search("What is the moon of Tarsis made of?", 1)[0].doc_id == "moon"
        assert time.perf_counter() - started < 10
        ingest(ix, {k: v for k, v in FACTS.items() if k in ("river", "bridge")}, lang="en")
        ingest(ix, {k: v for k, v in FACTS.items() if k in ("cheese", "comet")}, lang="de")
        assert ix.stats().index_kind == "milvus" and ix.stats().indexed_vectors == 5

        new_moon = "The moon of Tarsis is called Velna; it is made of red basalt, not ice."
        ix.upsert(DocumentIn("moon", new_moon, metadata={"lang": "en"}))
        assert ix.wait_until_indexed("moon", 2, 60)
        hits = ix.search(FACTS["moon"], 5)
        assert hits[0].doc_id == "moon" and hits[0].version == 2 and hits[0].text == new_moon
        assert FACTS["moon"] not in {h.text for h in hits}  # the stale version is gone from Milvus too

        assert ix.delete("cheese").status == "deleted"
        assert ix.wait_until_indexed("cheese", 2, 60)
        assert "cheese" not in {h.doc_id for h in ix.search(FACTS["cheese"], 5)}
        assert ix.stats().indexed_vectors == 4  # really removed, not just hidden

        only_de = ix.search("Which river is the longest in Oskaria?", 5, {"lang": "de"})
        assert {h.doc_id for h in only_de} == {"comet"}

    counting = CountingEmbedder(embedder)
    with caplog.at_level(logging.INFO, logger="kfresh.indexer"), Indexer(cfg, embedder=counting) as ix:
        assert "snapshot.loaded" in caplog.text  # the manifest reconnected; nothing was re-added
        assert ix.stats().indexed_vectors == 4
        for doc_id in ("moon", "river", "bridge", "comet"):
            assert ix.search(FACTS[doc_id], 1)[0].doc_id == doc_id
        assert ix.search(FACTS["moon"], 1)[0].version == 2
        assert "cheese" not in {h.doc_id for h in ix.search(FACTS["cheese"], 5)}
        assert counting.worker_encoded == []


def test_rebuild_reupserts_without_dropping_and_foreign_ids_never_surface(tmp_path, embedder):
    cfg = milvus_indexer_config(tmp_path)
    with Indexer(cfg, embedder=embedder) as ix:
        ingest(ix, FACTS)
        vec = embedder.encode([FACTS["comet"]])[0]
    foreign = create_index(cfg.index, embedder.dim)  # another replica's (or a stale) id, unknown to this store
    foreign.add(np.array([10**12]), vec[None])
    foreign.close()
    snapshot_path(cfg.index.snapshot_dir).unlink()  # forces the rebuild path at the next start
    with Indexer(cfg, embedder=CountingEmbedder(embedder)) as ix:
        assert ix.stats().indexed_vectors == len(FACTS) + 1  # nothing dropped, nothing duplicated
        hits = ix.search(FACTS["comet"], 5)
        assert hits[0].doc_id == "comet" and 10**12 not in {h.chunk_id for h in hits}
        assert len(hits) == len(FACTS)
