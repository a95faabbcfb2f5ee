"""ONNX embedding lanes vs one multi-threaded run, alone and beside busy processes.

    .venv/bin/python -m kfresh.benchmarks.lanes [--docs 640] [--rounds 2] [--out benchmarks/results]

The same exported model, texts (~60-word documents) and batch size (embedder.batch_size) through two
embedders: kfresh's OnnxEmbedder with one single-threaded lane per usable core (the default), and the same
class as one lane whose run uses that many intra-op threads (what the embedder did before lanes). Each is
measured alone and beside 1 and 2 busy Python processes, which stand in for what shares the cores during an
ingest: the gRPC acknowledgement path and the client. Within a round the two alternate, so the drift of a
shared box hits both alike. Writes lanes-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path
from typing import Any

from kfresh.benchmarks.common import environment
from kfresh.benchmarks.ingest import documents, encode_rate
from kfresh.benchmarks.report import Result, Table, write_result


def _busy(stop: Any) -> None:
    while not stop.is_set():
        sum(range(10_000))


def measure(docs: int, rounds: int, competitors: tuple[int, ...]) -> list[dict[str, Any]]:
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.onnx_embedder import OnnxEmbedder, usable_cores
    from kfresh.indexer.embedding.onnx_export import onnx_folder
    from kfresh.models import embedder_path

    cfg = KfreshConfig()
    folder = onnx_folder(embedder_path(cfg.models), cfg.models.cache_dir)
    cores, batch = usable_cores(), cfg.embedder.batch_size
    lanes = OnnxEmbedder(folder, name="lanes", threads=cores, batch_size=batch)
    single = OnnxEmbedder(folder, name="single", threads=1, intra_op_threads=cores, batch_size=batch)
    texts = documents(docs, 60, seed=0)
    rows = []
    for busy in competitors:
        stop = multiprocessing.Event()
        procs = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        try:
            time.sleep(0.5)  # let them reach their loops
            for r in range(rounds):
                first, second = (single, lanes) if r % 2 == 0 else (lanes, single)
                rates = {e.name: encode_rate(e.encode, texts, batch) for e in (first, second)}
                rows.append({"busy_processes": busy, "round": r, "lanes": cores, "single_docs_per_s": rates["single"],
                             "lanes_docs_per_s": rates["lanes"], "ratio": rates["lanes"] / rates["single"]})  # fmt: skip
                print(f"busy {busy} round {r}: one {cores}-thread run {rates['single']:.1f} docs/s, "
                      f"{cores} lanes {rates['lanes']:.1f} docs/s", flush=True)  # fmt: skip
        finally:
            stop.set()
            for p in procs:
                p.join(5)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=640, help="documents per measurement (default 640)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per competitor count (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    args = parser.parse_args()
    env = environment()  # before the busy processes raise the load average
    rows = measure(args.docs, args.rounds, (0, 1, 2))
    result = Result(
        suite="lanes", title="ONNX embedding: lanes vs one multi-threaded run", quick=False,
        command=f"python -m kfresh.benchmarks.lanes --docs {args.docs} --rounds {args.rounds}",
        settings={"docs": args.docs, "rounds": args.rounds, "words": 60}, env=env, raw={"rows": rows},
    )  # fmt: skip
    for busy in sorted({r["busy_processes"] for r in rows}):
        mine = [r for r in rows if r["busy_processes"] == busy]
        result.summary[f"lanes_vs_single_busy_{busy}"] = round(sum(r["ratio"] for r in mine) / len(mine), 3)
    result.tables.append(Table(
        f"{args.docs} documents of 60 words, batches of the configured size; docs/s",
        ["busy processes beside it", "round", "one run, intra-op threads = cores", "lanes (one single-threaded run per core)", "lanes / one run"],
        [[r["busy_processes"], r["round"], round(r["single_docs_per_s"], 1), round(r["lanes_docs_per_s"], 1),
          round(r["ratio"], 3)] for r in rows],
    ))  # fmt: skip
    result.notes.append(
        "A busy process is a Python loop that never sleeps: a stand-in for the acknowledgement path and "
        "the client, which take cores from the embedder during an ingest on this box."
    )
    result.notes.append(
        "An intra-op thread that loses its core stalls its partners at the next operator; a lane "
        "stalls only its own part of the batch."
    )
    written = write_result(result, args.out)
    print(f"wrote {written.json}, {written.markdown}")


if __name__ == "__main__":
    main()
