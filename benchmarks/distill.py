"""Full-size distillation of the shipped sample corpus with the default recipe: the finetuner's figures.

    .venv/bin/python benchmarks/distill.py [--seed 0] [--out benchmarks/results] [--set finetune.kl_weight=2]

Ingests kfresh/samples (day 1, then day 2) into a temporary store with the real Indexer, then runs
`run_distill` with the defaults (only `stable_for_s` is 0: the documents were just ingested) into a
temporary registry. Writes distill-<date>.json and .md with the gate's before/after figures, extraction
F1 and the time of each phase. Several minutes on a 2-core CPU; the box is shared, so timings are rough.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from kfresh.core.config import KfreshConfig
from kfresh.finetuner.distill import run_distill
from kfresh.finetuner.facts import parse_date
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.service import Indexer

SAMPLES = Path(__file__).resolve().parents[1] / "kfresh" / "samples"


def sample_rows() -> list[dict[str, Any]]:
    """The shipped sample corpus as JSONL rows, day 1 then day 2: the order it is ingested in."""
    return [json.loads(line) for day in (1, 2)
            for line in (SAMPLES / f"port_avel_day{day}.jsonl").read_text().splitlines() if line.strip()]  # fmt: skip


def ingest_samples(cfg: KfreshConfig) -> int:
    rows = sample_rows()
    with Indexer(cfg) as ix:
        for row in rows:
            ack = ix.upsert(DocumentIn(
                row["id"], row["text"], source=row.get("source", ""), metadata=row.get("metadata", {}),
                valid_from=parse_date(row["valid_from"]), supersedes=tuple(row.get("supersedes", [])),
            ))  # fmt: skip
            ix.wait_until_indexed(ack.id, ack.version, 60)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--set", action="append", default=[], help="finetune.FIELD=JSON, e.g. finetune.kl_weight=2")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kfresh-distill-bench-") as home:
        data = KfreshConfig().with_home(Path(home)).model_dump()
        data["models"]["cache_dir"] = str(KfreshConfig().models.cache_dir.resolve())
        data["finetune"].update(stable_for_s=0.0, seed=args.seed)
        for item in args.set:
            key, _, value = item.partition("=")
            section, _, field = key.partition(".")
            data[section][field] = json.loads(value)
        cfg = KfreshConfig.model_validate(data)
        docs = ingest_samples(cfg)
        started = time.perf_counter()
        result = run_distill(cfg)
        wall = time.perf_counter() - started
        report = json.loads(result.report_path.read_text()) if result.report_path else {}
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "documents_ingested": docs, "status": result.status, "passed": result.passed, "wall_s": round(wall, 1),
        "timings": result.timings, "figures": result.figures, "finetune": cfg.finetune.model_dump(mode="json"),
        "checks": report.get("checks", []), "training": report.get("training", {}),
        "samples": report.get("samples", {}),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"distill-{time.strftime('%Y-%m-%d')}-seed{args.seed}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str))
    stem.with_suffix(".md").write_text(_markdown(out))
    print(_markdown(out))


def _markdown(out: dict) -> str:
    f = out["figures"]
    rows = [
        ("held-out closed-book recall, new facts", "new_recall"), ("general questions right", "general_accuracy"),
        ("general-text perplexity", "perplexity"), ("retrieval, own passage", "retrieval_accuracy"),
        ("retrieval, contradicting passage followed", "counterfactual_accuracy"),
    ]  # fmt: skip
    lines = [f"# Distillation of the sample corpus ({out['date']}, {out['machine']})", "",
             f"{out['status']} (gate passed: {out['passed']}); {f.get('facts')} facts; wall {out['wall_s']} s; "
             f"timings {out['timings']}; extraction F1 {f.get('extraction_f1')}.", "",
             "| figure | base | adapter |", "|---|---|---|"]  # fmt: skip
    for label, key in rows:
        lines.append(f"| {label} | {f.get(key + '_before')} | {f.get(key + '_after')} |")
    lines += ["", "| check | passed | value | threshold | detail |", "|---|---|---|---|---|"]
    for c in out["checks"]:
        lines.append(f"| {c['name']} | {c['passed']} | {c['value']} | {c['threshold']} | {c['detail']} |")
    wrong = [
        (bucket, row)
        for bucket in ("general", "counterfactual", "new_facts")
        for row in out.get("samples", {}).get("after", {}).get(bucket, [])
        if row["ok"] != "True"
    ]
    if wrong:
        lines += ["", "Wrong answers with the adapter (as sampled by the gate report):", ""]
        lines += [f"- [{b}] {r['question']} -> {r['answer']!r} (expected {r['expected']!r})" for b, r in wrong]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
