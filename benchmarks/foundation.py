"""Foundation figures against a real `kfresh serve` (in-process vLLM): ingest rate, freshness, Retrieve, TTFT, memory.

    .venv/bin/python benchmarks/foundation.py [--docs 1000] [--out benchmarks/results]

Each figure is measured from the client side over gRPC on loopback. The baseline is in the same run:
raw sentence-transformers `encode` on the same texts, with the same batch size. Results go to
benchmarks/results/foundation-<date>.json and .md. The suite runs on a noisy 2-core CPU box, so read the
ratios; the absolute times are only rough.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kfresh.benchmarks.common import tree_peak_rss_mb
from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.core.config import KfreshConfig
from kfresh.core.net import free_port

WORDS = [
    "harbor",
    "ferry",
    "pier",
    "timetable",
    "bridge",
    "engineer",
    "council",
    "mayor",
    "library",
    "market",
    "festival",
    "river",
    "tower",
    "museum",
    "station",
    "tram",
    "ticket",
    "island",
    "lighthouse",
    "school",
    "garden",
    "square",
    "street",
    "archive",
    "theatre",
    "hospital",
    "bakery",
]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Note {i}: " + " ".join(rng.choice(WORDS, 60)) + "." for i in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def baseline_encode_rate(texts: list[str], batch_size: int) -> float:
    from kfresh.indexer.embedding.embedder import create_embedder

    embedder = create_embedder(KfreshConfig())
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        embedder.encode(texts[i : i + batch_size])
    return len(texts) / (time.perf_counter() - start)


def measure_ingest(client: KfreshClient, texts: list[str]) -> float:
    start = time.perf_counter()
    acks = list(client.ingest((document(f"b-{i}", t) for i, t in enumerate(texts)), timeout=600))
    assert len(acks) == len(texts)
    assert client.wait_searchable(600.0).searchable
    return len(texts) / (time.perf_counter() - start)


def measure_freshness(client: KfreshClient, n: int) -> list[float]:
    """Client-side lag: ack received -> first Retrieve that returns the document."""
    lags = []
    for i, text in enumerate(corpus(n, seed=1)):
        doc_id = f"fresh-{i}"
        list(client.ingest([document(doc_id, text)], timeout=30))
        acked = time.perf_counter()
        while not any(c.doc_id == doc_id for c in client.retrieve(text, k=3).chunks):
            pass
        lags.append((time.perf_counter() - acked) * 1000)
        time.sleep(0.05)
    return lags


def measure_retrieve(client: KfreshClient, n: int) -> tuple[list[float], list[float]]:
    client_ms, server_ms = [], []
    for q in corpus(n, seed=2):
        start = time.perf_counter()
        reply = client.retrieve(q[:120], k=5)
        client_ms.append((time.perf_counter() - start) * 1000)
        server_ms.append(reply.retrieval_ms)
    return client_ms, server_ms


def measure_answer(client: KfreshClient, n: int) -> tuple[list[float], list[float]]:
    ttft, total = [], []
    for i in range(n):
        start = time.perf_counter()
        first = 0.0
        for event in client.answer(f"What does note {i} say about the harbor ferry?", max_tokens=32, timeout=120):
            if not first and not event.HasField("done"):
                first = (time.perf_counter() - start) * 1000
        ttft.append(first)
        total.append((time.perf_counter() - start) * 1000)
    return ttft, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000, help="documents in the ingest run")
    parser.add_argument("--probes", type=int, default=50, help="freshness / Retrieve / Answer samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    cfg = KfreshConfig()
    texts = corpus(args.docs)
    encode_rate = baseline_encode_rate(texts, cfg.embedder.batch_size)
    home = Path(tempfile.mkdtemp(prefix="kfresh-bench-"))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kfresh.cli",
        "serve",
        "--server.port",
        str(port),
        "--store.path",
        str(home / "db"),
        "--index.snapshot_dir",
        str(home / "index"),
    ]
    started = time.perf_counter()
    log_file = open(home / "server.log", "wb")  # noqa: SIM115 - the server's stdout for its whole life; closed with the temp folder
    server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        with KfreshClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=300, service=SERVICE_NAME)
            client.wait_ready(timeout=300)
            ready_s = time.perf_counter() - started
            ingest_rate = measure_ingest(client, texts)
            lags = measure_freshness(client, args.probes)
            r_client, r_server = measure_retrieve(client, args.probes)
            ttft, total = measure_answer(client, max(5, args.probes // 5))
            stats = client.stats()
        peak_mb = tree_peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)

    summary = {
        "server_ready_s": ready_s,
        "ingest_docs_per_s": ingest_rate,
        "baseline_encode_docs_per_s": encode_rate,
        "ingest_vs_encode_ratio": ingest_rate / encode_rate,
        "freshness_client_ms": {"p50": pct(lags, 50), "p95": pct(lags, 95), "max": max(lags)},
        "freshness_server_ms": {
            "p50": stats.freshness.p50_ms,
            "p95": stats.freshness.p95_ms,
            "max": stats.freshness.max_ms,
        },
        "retrieve_client_ms": {"p50": pct(r_client, 50), "p95": pct(r_client, 95)},
        "retrieve_server_ms": {"p50": pct(r_server, 50)},
        "grpc_overhead_ms_p50": pct(r_client, 50) - pct(r_server, 50),
        "answer_ttft_ms": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
        "answer_total_ms_p50": statistics.median(total),
        "server_tree_peak_rss_mb": peak_mb,
        "corpus_docs": stats.documents,
    }
    env = {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "model": stats.model,
        "embedder": stats.embedder,
        "index": stats.index_kind,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    raw = {"freshness_client_ms": lags, "retrieve_client_ms": r_client, "answer_ttft_ms": ttft}
    (args.out / f"foundation-{stamp}.json").write_text(
        json.dumps({"summary": summary, "env": env, "raw": raw}, indent=2)
    )
    lines = [
        f"# Foundation figures ({stamp}, {env['cores']} cores, {env['model']}, {env['index']})",
        "",
        "Command: `.venv/bin/python benchmarks/foundation.py`",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key, value in summary.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.2f}"
        lines.append(f"| {key} | {shown} |")
    (args.out / f"foundation-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
