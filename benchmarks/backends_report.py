"""The `backends` suite's tables, headline figures, notes and plot (kept apart from the measuring code)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kfresh.benchmarks.common import percentiles
from kfresh.benchmarks.report import Result, Table


def _row(size: int, b: dict[str, Any]) -> list[Any]:
    lat, vis, rem = percentiles(b["search_ms"]), percentiles(b["visible_ms"]), percentiles(b["remove_ms"])
    probes = percentiles(b["probe_ms"])
    milvus = b["backend"].startswith("milvus")
    return [f"{size:,}", b["backend"], b["index"], round(b["add_per_s"]), round(b["maintain_s"], 2),
            round(b["settle_s"], 2) if milvus else "-", probes["max"] if b["probe_ms"] else "-",
            lat["p50"], lat["p95"], lat["p99"], round(b["recall"], 3), vis["p50"], vis["p95"], vis["max"],
            max(b["searches"]), rem["p50"]]  # fmt: skip


def _figures(b: dict[str, Any]) -> dict[str, Any]:
    lat, vis = percentiles(b["search_ms"]), percentiles(b["visible_ms"])
    return {
        "index": b["index"], "add_vectors_per_s": round(b["add_per_s"]), "maintain_s": round(b["maintain_s"], 3),
        "settle_s": round(b["settle_s"], 2), "settle_probe_max_ms": round(percentiles(b["probe_ms"])["max"], 1),
        "search_p50_ms": round(lat["p50"], 3), "search_p95_ms": round(lat["p95"], 3), "search_p99_ms": round(lat["p99"], 3),
        "recall_at_k": round(b["recall"], 4), "add_to_visible_p50_ms": round(vis["p50"], 3),
        "add_to_visible_p95_ms": round(vis["p95"], 3), "add_to_visible_max_ms": round(vis["max"], 3),
        "searches_until_visible_max": int(max(b["searches"])), "remove_one_p50_ms": round(percentiles(b["remove_ms"])["p50"], 3),
    }  # fmt: skip


def summarise(result: Result, opts: Any) -> None:
    """Fill the result's summary (per size and backend, plus Milvus/FAISS and torch/FAISS p50 ratios), table and notes."""
    rows, summary = [], {}
    for m in result.raw["sizes"]:
        per = {b["backend"]: _figures(b) for b in m["backends"]}
        for b in m["backends"]:
            rows.append(_row(m["size"], b))
        for other, faiss in (("milvus-flat", "faiss-flat"), ("milvus-ivf", "faiss-ivf"), ("torch", "faiss-flat")):
            if other in per and faiss in per:
                per[f"{other}_vs_{faiss}_p50"] = round(per[other]["search_p50_ms"] / per[faiss]["search_p50_ms"], 2)
        summary[str(m["size"])] = per
    result.summary = summary
    data = result.raw["sizes"][0]["data"] if result.raw["sizes"] else opts.data
    result.tables.append(Table(
        f"{opts.queries} single-vector searches, k={opts.k}, {data} vectors; latencies in ms; add -> visible over "
        f"{opts.visible_trials} trials",
        ["size", "backend", "index", "add vec/s", "maintain s", "settle s", "search during settle, max ms",
         "search p50", "p95", "p99", f"recall@{opts.k}", "add -> visible p50", "p95", "max", "searches until visible, max",
         "remove one p50"], rows,
    ))  # fmt: skip
    result.notes += _notes(opts, data)


def _notes(opts: Any, data: str) -> list[str]:
    return [
        "Every backend runs in this one process through kfresh's VectorIndex seam (add/remove/search), with the same "
        "vectors and queries. FAISS is a direct in-process call. milvus-lite 3.x is pure Python: pymilvus starts its gRPC "
        "server in a thread of the same process, so each Milvus call is a loopback gRPC round trip plus Python-side search; "
        "a Milvus server (C++, over a network) is a different system and these figures say nothing about it.",
        "maintain: IVF training and migration (faiss-ivf) or the Milvus flush that seals the bulk-added rows into a "
        "segment (milvus-*); settle: milvus-lite's background compaction and segment index build after that flush, "
        "waited for through its internal API while probe searches ran (their maximum is in the table).",
        "add -> visible: index.add() of one new vector, then searches until it is the top hit. FAISS is visible at once "
        "by construction; Milvus is queried with Strong consistency, so the first search must find it (column "
        "'searches until visible'). The first add after a bulk load can stall (FAISS grows its buffers).",
        "Where milvus-lite's time goes (profiled at 20k, FLAT): most of a search is Python bookkeeping over every "
        "stored row (the delete mask, the newest sequence number per key), not the distance computation, so its "
        "IVF_FLAT and HNSW searches still grow about linearly with n. A count(*) costs about as much, which is why "
        "MilvusIndex keeps its live count itself. A bulk add past its 128 MB memtable flushes during the add.",
        "Milvus add -> visible is one upsert plus one search. Inside the indexer, add() first looks the ids up (a "
        "primary-key query, ~1 ms) to keep the live count exact; this benchmark never asks for the count, so it skips that.",
        "recall@k is against exact inner-product search over the same vectors. Approximate indexes: FAISS IVF with "
        f"nlist min({opts.ivf_nlist}, n/39) and nprobe {opts.ivf_nprobe}; Milvus IVF_FLAT nlist {opts.ivf_nlist} per "
        f"segment (milvus-lite clamps it to the segment's rows), nprobe {opts.ivf_nprobe}; HNSW M {opts.hnsw_m}, ef {opts.hnsw_ef}.",
        "Real data: the benchmark corpus's cached all-MiniLM-L6-v2 embeddings (benchmarks/corpus.py), queries are "
        "embedded keyword queries about corpus documents." if data == "real" else
        "Synthetic data: unit vectors around 256 fixed centres (benchmarks/backends.py clustered()); queries drawn the same way.",
    ]  # fmt: skip


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    ax1, ax2, ax3 = series_axes(fig, 3)
    sizes = [m["size"] for m in result.raw["sizes"]]
    names = [b["backend"] for b in result.raw["sizes"][0]["backends"]] if sizes else []
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = np.arange(len(sizes)) + i * width
        per = [next(b for b in m["backends"] if b["backend"] == name) for m in result.raw["sizes"]]
        ax1.bar(xs, [percentiles(b["search_ms"])["p50"] for b in per], width, label=name)
        ax2.bar(xs, [b["recall"] for b in per], width, label=name)
        ax3.bar(xs, [percentiles(b["visible_ms"])["p50"] for b in per], width, label=name)
    for ax, ylabel in ((ax1, "search p50 (ms)"), (ax2, "recall@k"), (ax3, "add -> visible p50 (ms)")):
        ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, [f"{s:,}" for s in sizes])
        ax.set_xlabel("vectors")
        ax.set_ylabel(ylabel)
    ax1.set_yscale("log")
    ax2.set_ylim(0, 1.05)
    ax1.legend(fontsize=7)
