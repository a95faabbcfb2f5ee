"""Vector backends against exact ground truth on deterministic clustered data (uniform data flatters nothing)."""

from __future__ import annotations

import numpy as np
import pytest

from kfresh.core.config import IndexConfig
from kfresh.core.errors import Unavailable
from kfresh.indexer.vectors import create_index, index_from_bytes
from kfresh.indexer.vectors.flat import FlatIndex
from kfresh.indexer.vectors.gpu import gpu_available
from kfresh.indexer.vectors.ivf import IvfIndex
from kfresh.indexer.vectors.tombstone import TombstoneIndex
from kfresh.indexer.vectors.torch_exact import TorchIndex

DIM, K = 32, 10


def clustered(n: int, *, seed: int, centers: int = 64, spread: float = 1.0, topics: int = 1234) -> np.ndarray:
    """Unit vectors around fixed cluster centres (the centres depend only on `topics` and the dimension)."""
    c = np.random.default_rng(topics).standard_normal((centers, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = clustered(20_000, seed=1)
    ids = np.arange(10_000, 30_000, dtype=np.int64)  # ids are chunk ids, not positions
    queries = clustered(200, seed=2)
    return ids, base, queries


def exact(ids: np.ndarray, base: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: the top-k ids, and the k-th best score (float rounding may reorder near-ties)."""
    scores = queries @ base.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[top], np.take_along_axis(scores, top[:, -1:], axis=1)[:, 0]


def recall(
    found: np.ndarray, truth: tuple[np.ndarray, np.ndarray], base: np.ndarray, ids: np.ndarray, queries: np.ndarray
) -> float:
    """Share of found ids that belong in the true top-k (ties within 1e-5 of the k-th score count)."""
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    true_ids, kth = truth
    hits = 0
    for q, (f, t) in enumerate(zip(found, true_ids)):
        good = set(t.tolist())
        for i in f.tolist():
            if i in good or (i in row_of and float(queries[q] @ base[row_of[i]]) >= kth[q] - 1e-5):
                hits += 1
    return hits / true_ids.size


def tombstone_cpu(compact_ratio: float = 0.2) -> TombstoneIndex:
    import faiss

    return TombstoneIndex(DIM, faiss.IndexFlatIP, compact_ratio=compact_ratio)


def test_flat_is_exact_through_adds_removes_and_snapshots(data):
    ids, base, queries = data
    index = FlatIndex(DIM)
    index.add(ids, base)
    assert index.ntotal == len(ids)
    _, found = index.search(queries, K)
    assert recall(found, exact(ids, base, queries), base, ids, queries) == 1.0

    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0  # unknown ids are ignored
    keep = np.ones(len(ids), dtype=bool)
    keep[::3] = False
    _, found = index.search(queries, K)
    assert not set(found.ravel()) & set(gone.tolist())
    assert recall(found, exact(ids[keep], base[keep], queries), base[keep], ids[keep], queries) == 1.0

    restored = FlatIndex.from_bytes(index.to_bytes(), DIM)
    assert restored.ntotal == index.ntotal
    assert np.array_equal(restored.search(queries, K)[1], found)


def test_flat_pads_missing_results_with_minus_one():
    index = FlatIndex(DIM)
    _scores, found = index.search(clustered(2, seed=3), 5)
    assert found.shape == (2, 5) and (found == -1).all()
    index.add(np.array([7, 8]), clustered(2, seed=4))
    _, found = index.search(clustered(1, seed=5), 5)
    assert sorted(found[0, :2].tolist()) == [7, 8] and (found[0, 2:] == -1).all()


def test_ivf_is_exact_until_trained_then_recall_is_high(data):
    ids, base, queries = data
    index = IvfIndex(DIM, nlist=128, nprobe=16, train_min=5_000)
    index.add(ids[:4_000], base[:4_000])
    assert not index.needs_maintenance() and not index.trained
    _, found = index.search(queries, K)
    assert recall(found, exact(ids[:4_000], base[:4_000], queries), base[:4_000], ids[:4_000], queries) == 1.0

    index.add(ids[4_000:6_000], base[4_000:6_000])
    assert index.needs_maintenance()
    prepared = index.prepare_maintenance()
    index.add(ids[6_000:], base[6_000:])  # vectors added while training must not be lost
    index.apply_maintenance(prepared)
    assert index.trained and index.ntotal == len(ids)

    truth = exact(ids, base, queries)
    _, found = index.search(queries, K)
    measured = recall(found, truth, base, ids, queries)
    assert measured >= 0.9, f"IVF recall@10 {measured:.3f} at nprobe=16/128"
    # The data is hard enough that probing one list loses neighbours: the check above is not vacuous.
    one = IvfIndex.from_bytes(index.to_bytes(), DIM, nlist=128, nprobe=1, train_min=5_000)
    assert recall(one.search(queries, K)[1], truth, base, ids, queries) < measured


def test_ivf_removes_ids_and_survives_a_snapshot(data):
    ids, base, queries = data
    index = IvfIndex(DIM, nlist=64, nprobe=64, train_min=1_000)  # nprobe = nlist: exact, so comparable
    index.add(ids, base)
    index.maintain()
    gone = ids[1::2]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0
    _, found = index.search(queries, K)
    assert not set(found.ravel()) & set(gone.tolist())
    assert recall(found, exact(ids[::2], base[::2], queries), base[::2], ids[::2], queries) == 1.0

    cfg = IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=64, ivf_train_min=1_000)
    restored = index_from_bytes(cfg, DIM, index.to_bytes())
    assert restored.trained and restored.ntotal == index.ntotal
    assert np.array_equal(restored.search(queries, K)[1], found)
    assert restored.remove(ids[::2][:10]) == 10  # the direct map came back with it


def test_tombstones_match_flat_through_churn_and_compaction(data):
    ids, base, queries = data
    rng = np.random.default_rng(7)
    flat, tomb = FlatIndex(DIM), tombstone_cpu(compact_ratio=0.2)
    live: set[int] = set()
    vec_of = dict(zip(ids.tolist(), base))
    pool = ids[:3_000]
    for step in range(30):
        add = np.array(sorted(set(rng.choice(pool, 200).tolist()) - live), dtype=np.int64)
        vecs = np.stack([vec_of[i] for i in add.tolist()])
        flat.add(add, vecs)
        tomb.add(add, vecs)
        live |= set(add.tolist())
        drop = np.array(sorted(set(rng.choice(sorted(live), 120).tolist())), dtype=np.int64)
        assert tomb.remove(drop) == flat.remove(drop) == len(drop)
        live -= set(drop.tolist())
        if step % 3 == 2:
            tomb.maintain()
        assert tomb.ntotal == flat.ntotal == len(live)
        expect_scores, expect = flat.search(queries[:20], K)
        got_scores, got = tomb.search(queries[:20], K)
        assert np.array_equal(got, expect), f"step {step}"
        assert np.allclose(got_scores[got >= 0], expect_scores[expect >= 0], atol=1e-5)
    assert tomb.compactions > 0

    import faiss

    restored = TombstoneIndex.from_bytes(tomb.to_bytes(), DIM, faiss.IndexFlatIP)
    assert restored.ntotal == tomb.ntotal and restored.tombstones == 0
    assert np.array_equal(restored.search(queries[:20], K)[1], flat.search(queries[:20], K)[1])


def test_tombstone_readd_replaces_vector():
    tomb = tombstone_cpu()
    a, b = clustered(2, seed=9)
    tomb.add(np.array([5]), a[None])
    tomb.add(np.array([5]), b[None])
    assert tomb.ntotal == 1 and tomb.tombstones == 1
    scores, found = tomb.search(b[None], 3)
    assert found[0].tolist() == [5, -1, -1] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_auto_is_exact_when_small_then_holds_its_recall_through_growth_and_snapshots(data):
    """index.kind=auto: flat below the threshold; then an IVF whose nprobe was chosen by measuring recall on recent
    queries, which holds on queries it never saw; a retraining once the corpus grew 4x; a snapshot keeps the tuned
    nprobe; without enough recent queries, a sixteenth of the lists."""
    from kfresh.indexer.vectors.auto import AutoIndex

    ids, base, all_queries = data
    seen, queries = all_queries[:100], all_queries[100:]  # tuned on the first half, checked on the other
    index = AutoIndex(DIM, auto_min=4_000, recall=0.95)
    index.use_queries(lambda: seen)
    index.add(ids[:3_000], base[:3_000])
    assert not index.needs_maintenance() and not index.trained
    truth = exact(ids[:3_000], base[:3_000], queries)
    assert recall(index.search(queries, K)[1], truth, base[:3_000], ids[:3_000], queries) == 1.0

    index.add(ids[3_000:5_000], base[3_000:5_000])
    assert index.needs_maintenance()
    index.apply_maintenance(index.prepare_maintenance())  # the worker's turn: train, fill, choose nprobe
    assert index.trained and index.ntotal == 5_000 and index.measured_recall >= 0.95
    first_nlist = index._ivf.nlist
    truth = exact(ids[:5_000], base[:5_000], queries)
    measured = recall(index.search(queries, K)[1], truth, base[:5_000], ids[:5_000], queries)
    assert measured >= 0.93, f"recall@10 {measured:.3f} on unseen queries at nprobe={index._ivf.nprobe}"
    if index._ivf.nprobe > 1:  # the chosen nprobe is needed: one list fewer is measurably worse
        index._ivf.nprobe //= 2
        assert recall(index.search(queries, K)[1], truth, base[:5_000], ids[:5_000], queries) < measured
        index._ivf.nprobe *= 2

    index.add(ids[5_000:], base[5_000:])  # 4x the trained size: retrained over every vector, more lists
    assert index.needs_maintenance()
    index.apply_maintenance(index.prepare_maintenance())
    assert index.ntotal == len(ids) and index._ivf.nlist > first_nlist and index.trained_at == len(ids)
    assert index.remove(ids[:10]) == 10
    restored = index_from_bytes(IndexConfig(kind="auto", ivf_train_min=4_000), DIM, index.to_bytes())
    assert restored.kind == "auto" and restored.ntotal == len(ids) - 10
    assert restored._ivf.nprobe == index._ivf.nprobe  # tuned, not reset to a setting
    assert np.array_equal(restored.search(queries, K)[1], index.search(queries, K)[1])

    blind = AutoIndex(DIM, auto_min=4_000, recall=0.95)  # no queries seen yet (a server that just started)
    blind.add(ids[:5_000], base[:5_000])
    blind.maintain()
    assert blind.measured_recall is None and blind._ivf.nprobe == -(-blind._ivf.nlist // 16)


def test_auto_retrains_when_new_vectors_drift_away_from_its_centroids():
    """Vectors of topics the IVF was never trained on land far from its centroids: their residual over the
    trained one (the drift) passes 1.25, and the maintenance turn retrains, which gives back the recall the
    drift cost at the same share of lists probed. More vectors of the trained topics do not trigger it."""
    from kfresh.indexer.vectors.auto import AutoIndex

    old, more_old = clustered(5_000, seed=11), clustered(1_000, seed=12)
    new, new_queries = clustered(2_000, seed=13, topics=99), clustered(100, seed=14, topics=99)
    index = AutoIndex(DIM, auto_min=4_000, recall=0.95)
    index.add(np.arange(5_000), old)
    index.apply_maintenance(index.prepare_maintenance())
    assert index.trained and index.drift() == 1.0 and index.fit_reference

    index.add(np.arange(5_000, 6_000), more_old)  # the same topics: no drift
    assert index.drift() < 1.25 and not index.drifted() and not index.needs_maintenance()

    index.add(np.arange(6_000, 8_000), new)  # new topics
    assert index.drift() >= 1.25 and index.drifted() and index.needs_maintenance()
    assert "drift" in index.describe()
    ids, base = np.arange(8_000), np.concatenate([old, more_old, new])
    truth = exact(ids, base, new_queries)
    index._ivf.nprobe = -(-index._ivf.nlist // 16)  # compare at the same share of lists probed
    before = recall(index.search(new_queries, K)[1], truth, base, ids, new_queries)
    index.apply_maintenance(index.prepare_maintenance())
    assert index.trained_at == 8_000 and index.drift() == 1.0 and not index.needs_maintenance()
    index._ivf.nprobe = -(-index._ivf.nlist // 16)
    after = recall(index.search(new_queries, K)[1], truth, base, ids, new_queries)
    assert after > before, (before, after)


def test_factory_builds_each_cpu_kind():
    assert create_index(IndexConfig(), DIM).kind == "auto"  # the default
    assert create_index(IndexConfig(kind="flat"), DIM).kind == "flat"
    assert create_index(IndexConfig(kind="ivf"), DIM).kind == "ivf"
    assert create_index(IndexConfig(kind="torch", torch_device="cpu"), DIM).kind == "torch"


def test_torch_matches_flat_through_churn_readds_and_snapshots(data):
    ids, base, queries = data
    rng = np.random.default_rng(11)
    flat, torch_index = FlatIndex(DIM), TorchIndex(DIM, device="cpu")
    vec_of = dict(zip(ids.tolist(), base))
    live: set[int] = set()
    pool = ids[:4_000]  # > MIN_CAPACITY: the tensor grows while ids churn
    for step in range(25):
        add = np.array(sorted(set(rng.choice(pool, 300).tolist())), dtype=np.int64)  # some are re-adds
        vecs = np.stack([vec_of[i] for i in add.tolist()])
        if step % 2:
            vecs = vecs[:, ::-1].copy()  # a re-add with another vector must replace the old one
        flat.remove(add)
        flat.add(add, vecs)
        torch_index.add(add, vecs)
        live |= set(add.tolist())
        drop = np.array(sorted(set(rng.choice(sorted(live), 150).tolist())), dtype=np.int64)
        assert torch_index.remove(drop) == flat.remove(drop) == len(drop)
        assert torch_index.remove(drop) == 0  # unknown ids are ignored
        live -= set(drop.tolist())
        assert torch_index.ntotal == flat.ntotal == len(live)
        expect_scores, expect = flat.search(queries[:20], K)
        got_scores, got = torch_index.search(queries[:20], K)
        assert np.allclose(got_scores, expect_scores, atol=1e-5), f"step {step}"
        same = (got == expect).mean()  # ids may swap only between near-equal scores
        assert same > 0.99, f"step {step}: {same}"
    restored = index_from_bytes(IndexConfig(kind="torch", torch_device="cpu"), DIM, torch_index.to_bytes())
    assert restored.ntotal == torch_index.ntotal
    assert np.array_equal(restored.search(queries[:20], K)[1], torch_index.search(queries[:20], K)[1])


def test_torch_pads_missing_results_and_refuses_duplicate_ids():
    index = TorchIndex(DIM, device="cpu")
    scores, found = index.search(clustered(2, seed=3), 5)
    assert found.shape == (2, 5) and (found == -1).all()
    index.add(np.array([7, 8]), clustered(2, seed=4))
    scores, found = index.search(clustered(1, seed=5), 5)
    assert sorted(found[0, :2].tolist()) == [7, 8] and (found[0, 2:] == -1).all() and np.isinf(scores[0, 2:]).all()
    with pytest.raises(ValueError, match="duplicate"):
        index.add(np.array([9, 9]), clustered(2, seed=6))
    assert index.ntotal == 2


def test_torch_kind_on_cuda_without_cuda_is_an_actionable_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(Unavailable, match="torch_device"):
        create_index(IndexConfig(kind="torch", torch_device="cuda"), DIM)
    assert create_index(IndexConfig(kind="torch"), DIM).device.type == "cpu"  # auto: the CPU without CUDA


def test_gpu_kind_without_faiss_gpu_is_an_actionable_error():
    if gpu_available()[0]:
        pytest.skip("faiss GPU is available here")
    with pytest.raises(Unavailable, match="index.kind"):
        create_index(IndexConfig(kind="gpu"), DIM)


@pytest.mark.gpu
def test_gpu_flat_matches_cpu_flat(data):
    ok, why = gpu_available()
    if not ok:
        pytest.skip(why)
    ids, base, queries = data
    gpu = create_index(IndexConfig(kind="gpu", compact_ratio=0.1), DIM)
    flat = FlatIndex(DIM)
    for index in (gpu, flat):
        index.add(ids, base)
        index.remove(ids[::4])
    gpu.maintain()
    assert np.array_equal(gpu.search(queries, K)[1], flat.search(queries, K)[1])
    restored = index_from_bytes(IndexConfig(kind="gpu"), DIM, gpu.to_bytes())
    assert np.array_equal(restored.search(queries, K)[1], flat.search(queries, K)[1])


@pytest.mark.gpu
def test_torch_on_cuda_matches_cpu_flat(data):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    ids, base, queries = data
    gpu, flat = TorchIndex(DIM, device="cuda"), FlatIndex(DIM)
    for index in (gpu, flat):
        index.add(ids, base)
        index.remove(ids[::4])
    assert gpu.ntotal == flat.ntotal
    got_scores, got = gpu.search(queries, K)
    expect_scores, expect = flat.search(queries, K)
    assert np.allclose(got_scores, expect_scores, atol=1e-4) and (got == expect).mean() > 0.99
