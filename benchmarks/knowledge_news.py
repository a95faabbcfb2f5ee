"""knowledge_news: distillation on real news: the slice's own quiz questions closed-book and with retrieval.

A slice of RealTimeQA evidence (about 100 documents from consecutive weeks of October-December, written by
nobody here and never trained or tuned on) is ingested with the real Indexer and distilled by `run_distill` with
the finetuner's CURRENT defaults plus question pairs (`questions_per_doc` 4; `stable_for_s` 0: the documents
were just written): the template extractor and the question pairs without templates, trained, gated. The slice's quiz questions are the test:
no pair is built from them, and they are asked as free text, right when the right choice appears and no other
does (`realtimeqa.is_right`), in four settings (greedy, float32, transformers + peft):
  (a) base model, closed-book        (b) base model + retrieval
  (c) adapter, closed-book           (d) adapter + retrieval
Retrieval is the server's path (Indexer.search with answer.default_k, conflicts resolved, the best
answer.prompt_passages shown in answer.prompt_format) without the source quote the server appends after the
answer (the quote depends on retrieval only, not on the weights). General questions and general-text
perplexity are the gate's figures (base vs adapter). The adapter is evaluated whether or not the gate
publishes it. Issue 17's goal: (c) - (a) >= ((b) - (a)) / 2, with (d) >= (b).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from kfresh.benchmarks import realtimeqa
from kfresh.benchmarks.common import SuiteOptions, environment
from kfresh.benchmarks.knowledge import CACHE, SETTINGS, evaluate, share_cache, suite_config
from kfresh.benchmarks.report import Result, Table
from kfresh.benchmarks.transfer import TransferOptions, slice_of

NAMES = {"a": "base_closed_book", "b": "base_retrieval", "c": "adapter_closed_book", "d": "adapter_retrieval"}


class NewsKnowledgeOptions(SuiteOptions):
    dataset: str = Field("", description="RealTimeQA jsonl (default: $KFRESH_REALTIMEQA or ../shared/datasets/).")
    start: str = Field("2025-10-01", description="First question date of the slice (YYYY-MM-DD).")
    documents: int = Field(100, ge=1, description="Evidence documents in the slice, in date order from `start`.")
    seed: int = Field(0, description="finetune.seed.")
    finetune: dict[str, Any] = Field(
        default_factory=lambda: {"questions_per_doc": 4},
        description="finetune.* overrides of the current defaults (question pairs on: 4 per document).",
    )

    @classmethod
    def quick(cls) -> NewsKnowledgeOptions:
        return cls(documents=3, finetune={"max_epochs": 1, "time_budget_s": 20, "warmup_steps": 1,
                                          "questions_per_doc": 2})  # fmt: skip


def ingest(cfg: Any, questions: list[realtimeqa.Question]) -> int:
    from kfresh.core.time import parse_iso
    from kfresh.indexer.documents import DocumentIn
    from kfresh.indexer.service import Indexer

    with Indexer(cfg) as ix:
        for q in questions:
            ack = ix.upsert(DocumentIn(q.id, q.evidence, source=q.source, valid_from=parse_iso(q.date)))
            ix.wait_until_indexed(ack.id, ack.version, 60)
    return len(questions)


def rows_of(cfg: Any, questions: list[realtimeqa.Question]) -> list[dict[str, Any]]:
    """Each quiz question with its closed-book messages and the server's retrieval messages."""
    from kfresh.indexer.service import Indexer
    from kfresh.prompt import build_messages, closed_book_messages, resolve_conflicts
    from kfresh.server.reading import shown_passages

    a = cfg.answer
    rows = []
    with Indexer(cfg) as ix:
        for q in questions:
            hits = ix.search(q.question, a.default_k, with_vectors=True)
            kept = resolve_conflicts(hits, similarity=a.conflict_similarity, min_score=a.min_score,
                                     score_margin=a.score_margin).kept  # fmt: skip
            shown = shown_passages(kept, a.prompt_passages)
            rows.append({"id": q.id, "question": q.question, "choices": list(q.choices), "answer": q.answer,
                         "evidence_shown": q.id in {h.doc_id for h in shown},
                         "closed": closed_book_messages(q.question),
                         "rag": build_messages(q.question, shown, style=a.prompt_format)})  # fmt: skip
    return rows


def run(opts: NewsKnowledgeOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.finetuner.distill import run_distill

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = environment(dtype="float32 (transformers + peft)")
    questions = slice_of(TransferOptions(dataset=opts.dataset, start=opts.start, documents=opts.documents))
    with tempfile.TemporaryDirectory(prefix="kfresh-bench-news-") as tmp:
        cfg = suite_config(Path(tmp), seed=opts.seed, finetune=opts.finetune)
        docs = ingest(cfg, questions)
        warm = share_cache(CACHE, Path(cfg.finetune.work_dir) / "cache")
        started = time.perf_counter()
        distilled = run_distill(cfg)
        distill_s = time.perf_counter() - started
        share_cache(Path(cfg.finetune.work_dir) / "cache", CACHE)
        if not (distilled.run_dir / "adapter").is_dir():
            raise RuntimeError(f"distillation produced no adapter to evaluate (status {distilled.status})")
        rows = rows_of(cfg, questions)
        started = time.perf_counter()
        answers = evaluate(cfg, distilled.run_dir / "adapter", rows)
        eval_s = time.perf_counter() - started
        report = json.loads((distilled.run_dir / "gate-report.json").read_text())
    right = {key: [realtimeqa.is_right(a, r["choices"], r["answer"]) for a, r in zip(answers[key], rows)]
             for key, *_ in SETTINGS}  # fmt: skip
    timings = {"distill_s": round(distill_s, 1), "evaluate_s": round(eval_s, 1), **distilled.timings,
               "replay_cache_files_reused": warm}  # fmt: skip
    return _result(opts, quick, command, cfg=cfg, docs=docs, distilled=distilled, report=report, rows=rows,
                   answers=answers, right=right, timings=timings, env=env, addr=addr)  # fmt: skip


def _result(opts: NewsKnowledgeOptions, quick: bool, command: str, **m: Any) -> Result:
    fig, rows, right = m["distilled"].figures, m["rows"], m["right"]
    n = len(rows)
    share = {key: round(sum(right[key]) / n, 3) for key in right}
    transfer = m["distilled"].transfer.figures() if m["distilled"].transfer else {}
    facts_new = m["distilled"].new_facts
    pairs = sum(1 for f in facts_new if f.relation.startswith("asked:"))
    added = share["b"] - share["a"]
    result = Result(
        suite="knowledge_news", command=command, quick=quick,
        title="Distillation on real news: the slice's quiz questions closed-book and with retrieval, before and after",
        settings={**opts.model_dump(), "finetune_effective": m["cfg"].finetune.model_dump(mode="json")},
        env={**m["env"], "model": m["cfg"].models.generator, "documents": m["docs"]},
        raw={"rows": [{k: v for k, v in r.items() if k not in ("closed", "rag")} | {k: m["answers"][k][i] for k in share}
                      for i, r in enumerate(rows)],
             "gate": {"passed": m["distilled"].passed, "status": m["distilled"].status,
                      "checks": m["report"].get("checks", [])},
             "transfer": transfer, "timings": m["timings"]},
    )  # fmt: skip
    result.summary = {
        **{NAMES[key]: share[key] for key in share},
        "closed_book_gain": round(share["c"] - share["a"], 3),
        "retrieval_gain_over_closed_book": round(added, 3),
        "recovered_share": round((share["c"] - share["a"]) / added, 3) if added > 0 else None,
        "adapter_keeps_retrieval": share["d"] >= share["b"],
        "general_before": fig.get("general_accuracy_before"), "general_after": fig.get("general_accuracy_after"),
        "perplexity_before": fig.get("perplexity_before"), "perplexity_after": fig.get("perplexity_after"),
        "pairs_per_document": round(pairs / m["docs"], 2), "template_facts": len(facts_new) - pairs, "pairs": pairs,
        "gate_passed": m["distilled"].passed, "distill_s": m["timings"]["distill_s"],
        "evidence_shown": round(sum(r["evidence_shown"] for r in rows) / n, 3),
    }  # fmt: skip
    s = result.summary
    result.tables.append(Table(
        f"{n} quiz questions about {m['docs']} documents ({s['pairs']} question pairs, {s['template_facts']} template facts learned)",
        ["setting", "right", "general questions (gate)", "general-text perplexity (gate)"],
        [[f"({key}) {label}", share[key], s["general_after" if key in "cd" else "general_before"],
          s["perplexity_after" if key in "cd" else "perplexity_before"]] for key, label, *_ in SETTINGS],
    ))  # fmt: skip
    result.notes += [
        f"Closed-book gain (c - a) {s['closed_book_gain']} of the {s['retrieval_gain_over_closed_book']} that retrieval "
        f"adds (b - a): recovered share {s['recovered_share']} (goal >= 0.5); adapter + retrieval "
        f"{'>=' if s['adapter_keeps_retrieval'] else '<'} retrieval alone.",
        f"Gate {'passed' if m['distilled'].passed else 'REJECTED'} the adapter (status {m['distilled'].status}); "
        "it is evaluated either way.",
        f"Question pairs: {json.dumps(transfer)}.",
        f"Timings (s): {m['timings']}.",
        f"The question's evidence was among the passages shown for {s['evidence_shown']} of the questions.",
    ]
    if m.get("addr"):
        result.notes.append("--addr is ignored: this suite evaluates model weights in-process.")
    return result


def plot(result: Result, fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"({key}) {label}" for key, label, *_ in SETTINGS]
    ax.bar(range(4), [result.summary[NAMES[key]] for key, *_ in SETTINGS])
    ax.set_xticks(range(4), labels, fontsize=7, rotation=15)
    ax.set_ylabel("quiz questions right")
    ax.set_ylim(0, 1)
