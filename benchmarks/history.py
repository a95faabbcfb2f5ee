"""history: "as of" and "valid at" Retrieve latency over a store that holds several versions of every document,
beside the live Retrieve on the same store, and what the history costs in store size.

Each size's documents get `versions` versions, written through the store as ingest writes them (one transaction
per batch of 1,000) and applied as the worker applies them (vectors saved; a replaced version's chunk rows move
to history_chunks). Vectors are random unit vectors: latency does not depend on what they mean, and recall is
not measured here because the slice search is an exact scan of the slice's stored vectors by construction
(tests/test_history.py checks the slices themselves against a model). Latency is `Indexer.search` in this
process, query text in -> top k out (no gRPC): live, `as_of` at a time within each version's day, and `valid_at`
within each version's valid days.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, load_average, percentiles
from kfresh.benchmarks.report import Result, Table

DAY = 86_400.0
T0 = 1_800_000_000.0
BATCH = 1_000


class HistoryOptions(SuiteOptions):
    sizes: list[int] = Field(default_factory=lambda: [10_000, 100_000], description="Documents per store.")
    versions: int = Field(3, ge=1, le=20, description="Versions of every document (a day apart).")
    queries: int = Field(10, ge=1, description="Timed queries per mode.")
    k: int = Field(10, ge=1, le=100, description="k of every search.")

    @classmethod
    def quick(cls) -> HistoryOptions:
        return cls(sizes=[300], versions=2, queries=3)


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def build(path: Path, n: int, versions: int, dim: int) -> dict[str, Any]:
    """Write `versions` versions of `n` one-chunk documents; the store's size after the first and after all."""
    from kfresh.indexer.documents import DocumentIn, WriteOp
    from kfresh.indexer.rows import Applied
    from kfresh.indexer.stores.sqlite import SqliteStore

    rng = np.random.default_rng(7)
    sizes, started = [], time.perf_counter()
    for v in range(1, versions + 1):
        with SqliteStore(path) as store:  # closing checkpoints the WAL: the file sizes are the store's
            for start in range(0, n, BATCH):
                at = T0 + (v - 1) * DAY + start / n  # acknowledged within the version's day, in batch order
                texts = {f"d{i}": f"Document {i}, version {v}: the figure for item {i} is {v * 1000 + i}."
                         for i in range(start, min(n, start + BATCH))}  # fmt: skip
                ops = [WriteOp(d, DocumentIn(d, t, valid_from=T0 + (v - 1) * DAY), (t,)) for d, t in texts.items()]
                acks = store.write_many(ops, now=at)
                applied = []
                for ack in acks:
                    ids = np.array([r.chunk_id for r in store.chunks_for(ack.id, ack.version)], dtype=np.int64)
                    vecs = rng.standard_normal((len(ids), dim)).astype(np.float32)
                    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                    applied.append(Applied(ack.id, ack.version, False, at, 0.0, ids, vecs))
                store.save_applied(applied)
        sizes.append(_store_bytes(path))
    return {"bytes_by_versions": sizes, "build_s": round(time.perf_counter() - started, 1)}


def measure(n: int, opts: HistoryOptions) -> dict[str, Any]:
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.service import Indexer

    with tempfile.TemporaryDirectory(prefix="kfresh-history-") as tmp:
        cfg = KfreshConfig().with_home(Path(tmp))
        indexer = Indexer(cfg)
        dim = indexer.embedder.dim
        built = build(cfg.store.path, n, opts.versions, dim)
        indexer.start()
        try:
            rng = np.random.default_rng(11)
            modes: dict[str, list[float]] = {"live": [], "as_of": [], "valid_at": []}
            hits: dict[str, list[int]] = {m: [] for m in modes}
            for _ in range(opts.queries):
                i = int(rng.integers(n))
                day = int(rng.integers(opts.versions))
                question = f"What is the figure for item {i}?"
                for mode, as_of, valid_at in (("live", None, None), ("as_of", T0 + day * DAY + 0.999, None),
                                              ("valid_at", None, T0 + day * DAY + DAY / 2)):  # fmt: skip
                    start = time.perf_counter()
                    found = indexer.search(question, opts.k, as_of=as_of, valid_at=valid_at)
                    modes[mode].append((time.perf_counter() - start) * 1000)
                    hits[mode].append(len(found))
        finally:
            indexer.close()
    return {"size": n, "versions": opts.versions, **built, "ms": modes, "hits": hits,
            "load_1m_after": round(load_average(), 2)}  # fmt: skip


def run(opts: HistoryOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    env = environment(store="sqlite", search="Indexer.search in process (no gRPC)")
    measured = [measure(n, opts) for n in opts.sizes]
    result = Result(suite="history", title='"As of" / "valid at" Retrieve latency and the cost of history',
                    command=command, quick=quick, settings=opts.model_dump(), env=env, raw={"runs": measured})  # fmt: skip
    rows = []
    for m in measured:
        one, every = m["bytes_by_versions"][0], m["bytes_by_versions"][-1]
        per_extra = (every - one) / one / (m["versions"] - 1) if m["versions"] > 1 and one else None
        p = {mode: percentiles(ms) for mode, ms in m["ms"].items()}
        rows.append([f"{m['size']:,}", m["versions"], p["live"]["p50"], p["as_of"]["p50"], p["as_of"]["p95"],
                     p["valid_at"]["p50"], round(one / 2**20, 1), round(every / 2**20, 1),
                     round(per_extra, 2) if per_extra is not None else "-", m["build_s"], m["load_1m_after"]])  # fmt: skip
        result.summary[str(m["size"])] = {
            "live_p50_ms": round(p["live"]["p50"], 2), "as_of_p50_ms": round(p["as_of"]["p50"], 2),
            "valid_at_p50_ms": round(p["valid_at"]["p50"], 2),
            "extra_version_cost": round(per_extra, 3) if per_extra is not None else None,
        }  # fmt: skip
    result.tables.append(Table(
        f"k={opts.k}, {opts.queries} queries per mode; latencies in ms (Indexer.search: query text in -> top k out)",
        ["documents", "versions each", "live p50", "as_of p50", "as_of p95", "valid_at p50", "store MiB (1 version)",
         f"store MiB ({opts.versions} versions)", "size per extra version / store size",
         "build s", "load average after"], rows,
    ))  # fmt: skip
    result.notes += [
        "Goals (issue 19): as_of / valid_at p50 <= 50 ms at 100k documents x 3 versions; history <= 1.5x the store "
        "size per extra version; live Retrieve within 1.05x of a store without history (not measured here).",
        "The slice search reads the slice's history rows and stored vectors from SQLite on every query and scans them "
        "exactly: correct, and as slow as that reading is.",
        "Vectors are random unit vectors; texts are one sentence per version.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    runs = result.raw["runs"]
    modes = ["live", "as_of", "valid_at"]
    width = 0.8 / max(1, len(runs))
    for i, m in enumerate(runs):
        p50 = [percentiles(m["ms"][mode])["p50"] for mode in modes]
        ax.bar([x + i * width for x in range(len(modes))], p50, width, label=f"{m['size']:,} x {m['versions']}")
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(modes))], modes)
    ax.set_yscale("log")
    ax.set_ylabel("search p50 (ms, log)")
    ax.legend()
