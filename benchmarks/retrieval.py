"""retrieval: Retrieve latency and recall@10 vs corpus size, side by side with raw FAISS and LangChain's FAISS store.

For each size the same vectors go into (1) a `kfresh serve` started on a preloaded store (flat index up
to `flat_max`, IVF above it, as a user would configure it), (2) raw FAISS in this process (IndexFlatIP,
or IVFFlat with the server's nlist/nprobe above `flat_max`) and (3) LangChain's FAISS vector store
(its default flat L2 index, as `FAISS.from_embeddings` builds it). Every system embeds the query itself with the same
MiniLM model, so each latency is query text in -> top-10 out. recall@10 is against exact inner-product
search over the same vectors. gRPC overhead per call = client-side latency - the server's own
retrieval_ms. Sizes above the embedded cache are DERIVED (jittered copies of real embeddings, see
corpus.py) and labelled so.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, ms_since, percentiles, wait_index_maintained
from kfresh.benchmarks.report import Result, Table

LANGCHAIN_MEASURED_MS = 41.6  # FIELD-NOTES: LangChain similarity_search at 100k, measured earlier on this box


class RetrievalOptions(SuiteOptions):
    sizes: list[int] = Field(
        default_factory=lambda: [10_000, 100_000, 1_000_000], description="Corpus sizes (one-chunk documents)."
    )
    real_max: int = Field(
        100_000, ge=1, description="Largest number of really embedded texts; larger sizes are derived from them."
    )
    queries: int = Field(200, ge=1, description="Timed queries per size and system.")
    k: int = Field(10, ge=1, le=100, description="k for latency and recall@k.")
    flat_max: int = Field(
        200_000, ge=1, description="Up to this size the server and raw FAISS use exact flat search; IVF above."
    )
    ivf_nlist: int = Field(1024, ge=1, description="IVF lists (server and raw FAISS).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists probed.")
    langchain_max: int = Field(1_000_000, ge=0, description="Skip the LangChain store above this size (0 = never).")

    @classmethod
    def quick(cls) -> RetrievalOptions:
        return cls(sizes=[100, 400], real_max=200, queries=6, flat_max=200, ivf_nlist=4, ivf_nprobe=2)


def _langchain_embeddings(encode: Any) -> Any:
    """LangChain's Embeddings interface over the same MiniLM embedder."""
    from langchain_core.embeddings import Embeddings

    class MiniLM(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return encode(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return encode([text])[0].tolist()

    return MiniLM()


def corpus_for(n: int, opts: RetrievalOptions) -> tuple[str, np.ndarray, Any]:
    """(label, vectors, text_of) for size n: real embeddings up to real_max, derived above (label 'derived from N real')."""
    from kfresh.benchmarks import corpus

    real_n = min(n, opts.real_max)
    real = corpus.embeddings(real_n)
    if n <= opts.real_max:
        return "real", real, corpus.text
    return f"derived from {real_n:,} real", corpus.derived_vectors(real, n), lambda i: corpus.derived_text(i, real_n)


def recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (len(found) * k) if found else 0.0


def raw_faiss(vecs: np.ndarray, queries: list[str], encode: Any, opts: RetrievalOptions) -> dict[str, Any]:
    import faiss

    dim = vecs.shape[1]
    if len(vecs) <= opts.flat_max:
        index: Any = faiss.IndexFlatIP(dim)
        kind = "IndexFlatIP"
    else:
        nlist = min(opts.ivf_nlist, max(1, len(vecs) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vecs[np.random.default_rng(0).choice(len(vecs), min(len(vecs), nlist * 256), replace=False)]
        index.train(sample)
        index.nprobe = min(opts.ivf_nprobe, nlist)
        kind = f"IVFFlat nlist={nlist} nprobe={index.nprobe}"
    index.add(vecs)
    total, search, found = [], [], []
    for q in queries:
        start = time.perf_counter()
        qv = encode([q])
        mid = time.perf_counter()
        _, ids = index.search(qv, opts.k)
        search.append(ms_since(mid))
        total.append(ms_since(start))
        found.append(ids[0].tolist())
    return {"kind": kind, "total_ms": total, "search_ms": search, "found": found}


def langchain_store(vecs: np.ndarray, text_of: Any, queries: list[str], encode: Any, k: int) -> dict[str, Any]:
    """LangChain's FAISS store over the same vectors: its own constructor with the flat L2 index `from_embeddings`
    would build (filled from numpy; a list of 1M Python float lists would need ~12 GB), its own search path."""
    import faiss
    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS
    from langchain_core.documents import Document

    started = time.perf_counter()
    index = faiss.IndexFlatL2(vecs.shape[1])
    index.add(vecs)
    ids = [str(i) for i in range(len(vecs))]
    docstore = InMemoryDocstore(
        {ids[i]: Document(page_content=text_of(i), metadata={"row": i}) for i in range(len(vecs))}
    )
    store = FAISS(_langchain_embeddings(encode), index, docstore, dict(enumerate(ids)))
    build_s = time.perf_counter() - started
    total, found = [], []
    for q in queries:
        start = time.perf_counter()
        docs = store.similarity_search(q, k=k)
        total.append(ms_since(start))
        found.append([d.metadata["row"] for d in docs])
    return {"kind": "langchain_community FAISS (IndexFlatL2)", "total_ms": total, "found": found, "build_s": build_s}


def server_retrieve(
    vecs: np.ndarray, text_of: Any, label: str, queries: list[str], opts: RetrievalOptions, addr: str | None
) -> dict[str, Any]:
    from kfresh.benchmarks.preload import cached_store, home_with_store, row_of
    from kfresh.testing.servers import NO_GENERATION, kfresh_server
    from kfresh.testing.servers import client as connect

    settings: dict[str, Any] = dict(NO_GENERATION)
    kind = "flat"
    if len(vecs) > opts.flat_max:
        kind = "ivf"
        settings.update({"index.kind": "ivf", "index.ivf_nlist": opts.ivf_nlist, "index.ivf_nprobe": opts.ivf_nprobe,
                         "index.ivf_train_min": min(len(vecs), 20_000)})  # fmt: skip
    home = None
    if not addr:
        name = "corpus" if label == "real" else f"derived{opts.real_max}"
        store = cached_store(name, vecs, text_of)
        home = home_with_store(store, Path(tempfile.mkdtemp(prefix="kfresh-bench-retrieval-")))
    with kfresh_server(settings, addr=addr, home=home, remove_home=True) as target, connect(target.addr) as client:
        detail = wait_index_maintained(client)
        for q in queries[:5]:  # warm-up on other texts: the server caches query embeddings
            client.retrieve(f"{q} warm-up", k=opts.k, timeout=60)
        total, server, found = [], [], []
        for q in queries:
            start = time.perf_counter()
            reply = client.retrieve(q, k=opts.k, timeout=60)
            total.append(ms_since(start))
            server.append(reply.retrieval_ms)
            found.append([row_of(c.doc_id) for c in reply.chunks])
        stats = client.stats()
    return {"kind": f"kfresh {stats.index_kind or kind}", "index_detail": detail, "total_ms": total, "server_ms": server, "found": found,
            "ready_s": target.ready_s, "documents": int(stats.documents)}  # fmt: skip


def measure_size(n: int, opts: RetrievalOptions, encode: Any, addr: str | None) -> dict[str, Any]:
    import faiss

    from kfresh.benchmarks import corpus

    label, vecs, text_of = corpus_for(n, opts)
    queries = corpus.queries(opts.queries, min(n, opts.real_max))
    exact = faiss.IndexFlatIP(vecs.shape[1])
    exact.add(vecs)
    _, truth = exact.search(encode(queries), opts.k)
    del exact
    systems: dict[str, dict[str, Any]] = {"server": server_retrieve(vecs, text_of, label, queries, opts, addr)}
    systems["faiss"] = raw_faiss(vecs, queries, encode, opts)
    gc.collect()
    if opts.langchain_max and n <= opts.langchain_max:
        try:
            systems["langchain"] = langchain_store(vecs, text_of, queries, encode, opts.k)
        except ImportError as exc:
            systems["langchain"] = {
                "skipped": f"langchain-community is not installed ({exc}): pip install langchain-community==0.4.2"
            }
    gc.collect()
    for data in systems.values():
        if "found" in data:
            data["recall"] = recall(data.pop("found"), truth, opts.k)
    return {"size": n, "vectors": label, "systems": systems}


def run(opts: RetrievalOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    env = environment(server="external" if addr else "kfresh serve, no generation")
    embedder = create_embedder(KfreshConfig())
    sizes = opts.sizes[:1] if addr else opts.sizes  # an external server holds whatever corpus it holds
    measured = [measure_size(n, opts, embedder.encode, addr) for n in sizes]
    result = Result(suite="retrieval", title="Retrieve latency and recall@10 vs corpus size", command=command, quick=quick,
                    settings=opts.model_dump(), env=env,
                    raw={"sizes": measured})  # fmt: skip
    rows, summary = [], {}
    for m in measured:
        s = m["systems"]
        srv = percentiles(s["server"]["total_ms"])
        own = percentiles(s["server"]["server_ms"])
        overhead = percentiles([c - v for c, v in zip(s["server"]["total_ms"], s["server"]["server_ms"])])
        fa = percentiles(s["faiss"]["total_ms"])
        lc = percentiles(s["langchain"]["total_ms"]) if "total_ms" in s.get("langchain", {}) else None
        rows.append([f"{m['size']:,} ({m['vectors']})", s["server"]["kind"], srv["p50"], srv["p95"], srv["p99"], overhead["p50"],
                     round(s["server"]["recall"], 3), fa["p50"], round(s["faiss"]["recall"], 3),
                     lc["p50"] if lc else "-", round(s["langchain"]["recall"], 3) if lc else "-",
                     round(srv["p50"] / lc["p50"], 2) if lc else "-"])  # fmt: skip
        summary[str(m["size"])] = {
            "vectors": m["vectors"], "server_p50_ms": round(srv["p50"], 2), "server_p99_ms": round(srv["p99"], 2),
            "server_own_p50_ms": round(own["p50"], 2), "grpc_overhead_p50_ms": round(overhead["p50"], 2),
            "server_recall": round(s["server"]["recall"], 4), "server_index": s["server"].get("index_detail", ""),
            "faiss_p50_ms": round(fa["p50"], 2),
            "faiss_search_only_p50_ms": round(percentiles(s["faiss"]["search_ms"])["p50"], 2),
            "faiss_recall": round(s["faiss"]["recall"], 4),
            "langchain_p50_ms": round(lc["p50"], 2) if lc else None,
            "server_vs_langchain_p50": round(srv["p50"] / lc["p50"], 3) if lc else None,
        }  # fmt: skip
    result.summary = summary
    result.tables.append(Table(
        f"k={opts.k}, {opts.queries} queries per size, latencies in ms from query text to top-k",
        ["size", "kfresh index", "Retrieve p50", "p95", "p99", "gRPC overhead p50", "recall@10", "raw FAISS p50",
         "FAISS recall", "LangChain p50", "LangChain recall", "kfresh / LangChain p50"], rows,
    ))  # fmt: skip
    result.notes += [
        "Targets: at 100k, Retrieve p50 <= half of LangChain's similarity_search; at 1M, p50 <= 25 ms with recall@10 >= 0.95 "
        "on real embeddings.",
        "Texts are synthetic topic-structured passages (benchmarks/corpus.py); their vectors are real all-MiniLM-L6-v2 "
        "embeddings. Sizes marked 'derived' are NOT all embedded: each extra vector is a jittered copy (cosine ~0.9) of a "
        "real one, so recall there is on real-embedding-like but not real data.",
        "Raw FAISS and LangChain run in the benchmark process (no network); kfresh is a separate server process over loopback gRPC.",
    ]  # fmt: skip
    if addr:
        result.notes.append(
            f"--addr {addr}: only the first size ran, and the server's recall means something only if it holds this "
            "corpus under the ids c<row> (benchmarks/preload.py)."
        )
    return result


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    ax1, ax2 = series_axes(fig, 2)
    sizes = [m["size"] for m in result.raw["sizes"]]
    for name, label in (
        ("server", "kfresh Retrieve (gRPC)"),
        ("faiss", "raw FAISS in-process"),
        ("langchain", "LangChain FAISS"),
    ):
        pts = [(m["size"], m["systems"][name]) for m in result.raw["sizes"] if "total_ms" in m["systems"].get(name, {})]
        if pts:
            ax1.plot(
                [p[0] for p in pts], [float(np.percentile(p[1]["total_ms"], 50)) for p in pts], marker="o", label=label
            )
            ax2.plot([p[0] for p in pts], [p[1]["recall"] for p in pts], marker="o", label=label)
    for ax, ylabel in ((ax1, "p50 latency (ms)"), (ax2, "recall@10")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.set_xlabel("corpus size (chunks)")
        ax.set_ylabel(ylabel)
        ax.legend()
    ax2.set_ylim(0, 1.05)
