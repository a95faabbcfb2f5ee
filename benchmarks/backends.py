"""backends: the vector backends side by side on the same vectors: FAISS flat and IVF, the torch index (exact) vs Milvus (milvus-lite) FLAT, IVF_FLAT, HNSW.

Every backend is driven through kfresh's own VectorIndex seam (what the indexer calls), in one process,
on the same N unit vectors (real all-MiniLM-L6-v2 embeddings of the benchmark corpus, or deterministic
clustered synthetic ones with --set data=synthetic) and the same queries. Per backend: ingest (add in
8,192-vector batches as a rebuild does, then the maintenance step: IVF training or a Milvus flush, then
milvus-lite's background compaction and index build, with probe searches during it), single-query search
latency p50/p95/p99, recall@k against exact inner-product ground truth, and add -> visible (one new
vector added, then searched until it is the top hit) plus removing it again.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, ms_since
from kfresh.benchmarks.report import Result

Backend = Literal["faiss-flat", "faiss-ivf", "torch", "milvus-flat", "milvus-ivf", "milvus-hnsw"]
BACKENDS: tuple[Backend, ...] = ("faiss-flat", "faiss-ivf", "torch", "milvus-flat", "milvus-ivf", "milvus-hnsw")
_MILVUS_TYPES = {"milvus-flat": "FLAT", "milvus-ivf": "IVF_FLAT", "milvus-hnsw": "HNSW"}
_ADD_BATCH = 8_192  # store.iter_embedded's batch: what a rebuild hands to index.add()
_VISIBLE_BASE_ID = 10**12


class BackendsOptions(SuiteOptions):
    sizes: list[int] = Field(default_factory=lambda: [20_000, 100_000], description="Vectors per run (chunks).")
    data: Literal["real", "synthetic"] = Field(
        "real", description="real: cached corpus embeddings + embedded query texts; synthetic: clustered unit vectors."
    )
    dim: int = Field(384, ge=2, description="Dimension of synthetic vectors (real ones are the embedder's, 384).")
    backends: list[Backend] = Field(list(BACKENDS), description="Backends to measure, in this order.")
    queries: int = Field(200, ge=1, description="Timed single-vector searches per backend and size.")
    k: int = Field(10, ge=1, le=100, description="k for latency and recall@k.")
    visible_trials: int = Field(50, ge=1, description="add -> visible trials per backend and size.")
    ivf_nlist: int = Field(1024, ge=1, description="IVF lists (FAISS ivf and Milvus IVF_FLAT; FAISS caps it at n/39).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists probed per query (both).")
    hnsw_m: int = Field(16, ge=2, description="Milvus HNSW graph degree.")
    hnsw_ef: int = Field(64, ge=1, description="Milvus HNSW search breadth.")

    @classmethod
    def quick(cls) -> BackendsOptions:
        return cls(sizes=[2_000], data="synthetic", dim=64, queries=20, visible_trials=5, ivf_nlist=32, ivf_nprobe=8)


def clustered(n: int, dim: int, *, seed: int, centers: int = 256, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around fixed centres (uniform random vectors would flatter no index and fail every approximate one)."""
    c = np.random.default_rng(1234).standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dataset(n: int, opts: BackendsOptions, encode: Any) -> tuple[np.ndarray, np.ndarray]:
    """(base vectors, query vectors) for size n."""
    if opts.data == "synthetic":
        return clustered(n, opts.dim, seed=1), clustered(opts.queries, opts.dim, seed=2)
    from kfresh.benchmarks import corpus

    return corpus.embeddings(n), np.asarray(encode(corpus.queries(opts.queries, n)), dtype=np.float32)


def index_config(name: str, n: int, opts: BackendsOptions, folder: str) -> Any:
    from kfresh.core.config import IndexConfig

    if name == "faiss-flat":
        return IndexConfig(kind="flat")
    if name == "torch":  # index.kind=torch: exact, on CUDA where torch sees one (the CPU here)
        return IndexConfig(kind="torch")
    if name == "faiss-ivf":  # trains once on everything after the bulk add, as a rebuild's maintain() does
        return IndexConfig(kind="ivf", ivf_nlist=opts.ivf_nlist, ivf_nprobe=opts.ivf_nprobe, ivf_train_min=n)
    return IndexConfig(kind="milvus", milvus_uri=os.path.join(folder, f"{name}.db"), milvus_index_type=_MILVUS_TYPES[name],
                       milvus_nlist=opts.ivf_nlist, milvus_nprobe=opts.ivf_nprobe, milvus_hnsw_m=opts.hnsw_m,
                       milvus_hnsw_ef=opts.hnsw_ef)  # fmt: skip


def ingest(index: Any, base: np.ndarray) -> dict[str, Any]:
    """Bulk add in rebuild-sized batches, then maintenance (IVF training / Milvus flush), then milvus-lite's background work."""
    ids = np.arange(len(base), dtype=np.int64)
    start = time.perf_counter()
    for at in range(0, len(base), _ADD_BATCH):
        index.add(ids[at : at + _ADD_BATCH], base[at : at + _ADD_BATCH])
    add_s = time.perf_counter() - start
    start = time.perf_counter()
    index.maintain()
    out = {"add_s": add_s, "add_per_s": len(base) / add_s, "maintain_s": time.perf_counter() - start}
    out.update(settle(index, base[:8]))
    return out


def settle(index: Any, probes: np.ndarray) -> dict[str, Any]:
    """milvus-lite compacts and builds segment indexes on a background thread after a flush. Wait for it (its
    internal API, benchmark only) while probe searches run, so their latency right after a bulk load is on record."""
    collection = _milvus_lite_collection(index)
    if collection is None:
        return {"settle_s": 0.0, "probe_ms": []}
    done = threading.Event()

    def wait() -> None:
        try:
            collection._wait_for_bg(timeout=1800)
        finally:
            done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    start = time.perf_counter()
    waiter.start()
    probe_ms: list[float] = []
    while not done.wait(0.05):
        t = time.perf_counter()
        index.search(probes[len(probe_ms) % len(probes)][None], 10)
        probe_ms.append(ms_since(t))
    return {"settle_s": time.perf_counter() - start, "probe_ms": probe_ms}


def _milvus_lite_collection(index: Any) -> Any:
    if getattr(index, "kind", "") != "milvus" or not index.local:
        return None
    try:
        from milvus_lite.server_manager import server_manager_instance

        _, db, _ = server_manager_instance._servers[os.path.abspath(index.uri)]
        return db.get_collection(index.collection)
    except (ImportError, AttributeError, KeyError, ValueError):  # internals moved: measure without settling
        return None


def search_latency(index: Any, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    for q in queries[:5]:  # warm-up
        index.search(q[None], k)
    times, found = [], np.full((len(queries), k), -1, dtype=np.int64)
    for row, q in enumerate(queries):
        t = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(ms_since(t))
        found[row] = ids[0]
    return times, found


def add_to_visible(index: Any, base: np.ndarray, trials: int, timeout_s: float = 5.0) -> dict[str, list[float]]:
    """Add one new vector (a jittered copy of a stored one), search until it is the top hit; then remove it."""
    rng = np.random.default_rng(3)
    out: dict[str, list[float]] = {"add_ms": [], "visible_ms": [], "searches": [], "remove_ms": []}
    for t in range(trials):
        jittered = base[rng.integers(len(base))] + rng.standard_normal(size=(base.shape[1],)).astype(np.float32) * 0.02
        v = np.asarray(jittered / np.linalg.norm(jittered), dtype=np.float32)[None]
        new_id = np.array([_VISIBLE_BASE_ID + t])
        start = time.perf_counter()
        index.add(new_id, v)
        out["add_ms"].append(ms_since(start))
        searches = 0
        while time.perf_counter() - start < timeout_s:
            searches += 1
            if index.search(v, 1)[1][0, 0] == new_id[0]:
                break
        out["visible_ms"].append(ms_since(start))
        out["searches"].append(float(searches))
        start = time.perf_counter()
        index.remove(new_id)
        out["remove_ms"].append(ms_since(start))
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def measure_backend(
    name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, opts: BackendsOptions
) -> dict[str, Any]:
    from kfresh.indexer.vectors import create_index

    folder = tempfile.mkdtemp(prefix="kfresh-bench-backends-")
    index = create_index(index_config(name, len(base), opts, folder), base.shape[1])
    try:
        built = ingest(index, base)
        times, found = search_latency(index, queries, opts.k)
        visible = add_to_visible(index, base, opts.visible_trials)
        detail = getattr(index, "index_type", None) or _faiss_or_torch_detail(name, index)
        return {"backend": name, "index": detail, **built, "search_ms": times, "recall": recall_at(found, truth),
                **visible}  # fmt: skip
    finally:
        index.close()
        del index
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)


def _faiss_or_torch_detail(name: str, index: Any) -> str:
    if name == "torch":
        return f"torch matmul + topk ({index.device})"
    return "IVFFlat" if name == "faiss-ivf" else "IndexFlatIP"


def measure_size(n: int, opts: BackendsOptions, encode: Any) -> dict[str, Any]:
    import faiss

    base, queries = dataset(n, opts, encode)
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(queries, opts.k)
    del exact
    return {"size": n, "data": opts.data, "dim": int(base.shape[1]),
            "backends": [measure_backend(b, base, queries, truth, opts) for b in opts.backends]}  # fmt: skip


def run(opts: BackendsOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.benchmarks.backends_report import summarise

    if addr:
        raise SystemExit("kfresh bench backends measures the index backends in-process; --addr does not apply")
    encode = None
    if opts.data == "real":
        from kfresh.core.config import KfreshConfig
        from kfresh.indexer.embedding.embedder import create_embedder

        encode = create_embedder(KfreshConfig()).encode
    env = environment(
        server="none: backends in-process through the VectorIndex seam", packages_milvus=_milvus_versions()
    )
    measured = [measure_size(n, opts, encode) for n in opts.sizes]
    result = Result(suite="backends", title="Vector backends side by side: FAISS vs torch vs Milvus (milvus-lite) on the same vectors",
                    command=command, quick=quick, settings=opts.model_dump(), env=env, raw={"sizes": measured})  # fmt: skip
    summarise(result, opts)
    return result


def _milvus_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("pymilvus", "milvus-lite"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.backends_report import plot as draw

    draw(result, fig)
