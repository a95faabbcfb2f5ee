"""index.kind=auto under drift: does the drift measure see new topics, and does retraining give recall back?

    .venv/bin/python -m kfresh.benchmarks.drift [--out benchmarks/results]

Real MiniLM vectors of the benchmark corpus (`corpus.py`: topic-structured texts, 1,000 topics). An AutoIndex
is trained on 20,000 documents of topics 0-499, then 10,000 more are added in steps of 2,000: in the control,
more documents of the same topics; under drift, documents of topics 500-999, which the IVF never saw. After
each step: the drift measure (`AutoIndex.drift`: the added vectors' mean residual to their nearest centroid
over the trained one), whether it asks for retraining, and recall@10 against an exact search for 300
keyword queries about the added documents, at a sixteenth of the lists probed. Then the worker's maintenance
turn runs (it retrains only when asked) and recall is measured again at the same share.
Writes drift-<date>.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from kfresh.benchmarks import corpus
from kfresh.benchmarks.common import environment
from kfresh.benchmarks.report import Result, Table, write_result

TRAINED, ADDED, STEP, QUERIES = 20_000, 10_000, 2_000, 300


def topic_of(i: int) -> int:
    return int(np.random.default_rng(i + 1_000_003).integers(corpus.TOPICS))  # as corpus.text draws it


def keyword_queries(docs: np.ndarray) -> list[str]:
    """10 shuffled words of each document (as corpus.query does)."""
    out = []
    for d in docs.tolist():
        words = corpus.text(d).rstrip(".").lower().split()
        out.append(" ".join(words[k] for k in np.random.default_rng(d).choice(len(words), 10, replace=False)))
    return out


def recall_at_10(index: Any, exact: Any, q: np.ndarray) -> float:
    _, got = index.search(q, 10)
    _, want = exact.search(q, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist(), strict=True)]))


def at_share(index: Any) -> None:
    index._ivf.nprobe = -(-index._ivf.nlist // 16)  # a sixteenth, the rule without recent queries


def measure() -> dict[str, Any]:
    from kfresh.indexer.vectors.auto import AutoIndex
    from kfresh.indexer.vectors.flat import FlatIndex

    n = 2 * (TRAINED + ADDED)
    vecs = corpus.embeddings(n)
    topics = np.array([topic_of(i) for i in range(n)])
    old, new = np.where(topics < corpus.TOPICS // 2)[0], np.where(topics >= corpus.TOPICS // 2)[0]
    encode = corpus._default_encoder()
    out: dict[str, Any] = {}
    for scenario in ("control", "drift"):
        index, exact = AutoIndex(vecs.shape[1], auto_min=TRAINED, recall=0.95), FlatIndex(vecs.shape[1])
        base = old[:TRAINED]
        index.add(base, vecs[base])
        exact.add(base, vecs[base])
        index.apply_maintenance(index.prepare_maintenance())
        added = old[TRAINED : TRAINED + ADDED] if scenario == "control" else new[:ADDED]
        asked = added[np.random.default_rng(1).choice(len(added), QUERIES, replace=False)]
        q = np.asarray(encode(keyword_queries(asked)), dtype=np.float32)
        steps = []
        for start in range(0, ADDED, STEP):
            part = added[start : start + STEP]
            index.add(part, vecs[part])
            exact.add(part, vecs[part])
            at_share(index)
            steps.append({"added": start + STEP, "drift": round(index.drift(), 3), "retrain_asked": index.drifted(),
                          "recall": round(recall_at_10(index, exact, q), 3)})  # fmt: skip
        asked_for = index.needs_maintenance()
        if asked_for:
            index.apply_maintenance(index.prepare_maintenance())
        at_share(index)
        out[scenario] = {"steps": steps, "maintenance_retrained": asked_for,
                         "recall_after": round(recall_at_10(index, exact, q), 3), "index": index.describe()}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    args = parser.parse_args()
    env = environment(embedder="all-MiniLM-L6-v2")
    raw = measure()
    result = Result(suite="drift", title="index.kind=auto: retraining when new topics arrive", quick=False,
                    command="python -m kfresh.benchmarks.drift", env=env, raw=raw,
                    settings={"trained": TRAINED, "added": ADDED, "step": STEP, "queries": QUERIES})  # fmt: skip
    for name, rec in raw.items():
        result.summary[f"{name}_drift"] = rec["steps"][-1]["drift"]
        result.summary[f"{name}_recall_before"] = rec["steps"][-1]["recall"]
        result.summary[f"{name}_recall_after"] = rec["recall_after"]
        result.summary[f"{name}_retrained"] = rec["maintenance_retrained"]
    rows = [[name, s["added"], s["drift"], "yes" if s["retrain_asked"] else "no", s["recall"]]
            for name, rec in raw.items() for s in rec["steps"]]  # fmt: skip
    result.tables.append(Table(
        f"After each step of {STEP:,} added vectors ({TRAINED:,} trained); recall@10 of {QUERIES} queries about the "
        "added documents, a sixteenth of the lists probed",
        ["scenario", "vectors added", "drift (residual / trained)", "retrain asked", "recall@10"], rows))  # fmt: skip
    result.tables.append(Table("The maintenance turn", ["scenario", "retrained", "recall@10 before", "recall@10 after", "index after"],
        [[name, "yes" if rec["maintenance_retrained"] else "no", rec["steps"][-1]["recall"], rec["recall_after"],
          rec["index"]] for name, rec in raw.items()]))  # fmt: skip
    result.notes.append(
        "Drift is 1 - cosine to the nearest centroid of the vectors added since training, over the same of the "
        "training vectors; retraining is asked from 1.25x over at least 1,000 added vectors and a tenth of the "
        "trained size (indexer/vectors/auto.py). k-means fits its own training vectors a little better than new "
        "ones of the same topics: that is the control's ~1.07x."
    )
    written = write_result(result, args.out)
    print(f"wrote {written.json}, {written.markdown}")


if __name__ == "__main__":
    main()
