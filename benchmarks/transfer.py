"""transfer: what distillation can learn from real news: template-free question pairs vs template facts, per document.

A slice of RealTimeQA evidence (a few consecutive weeks of October-December: documents nobody here wrote) is
turned into a transfer set the way `kfresh distill --dry-run --questions N` does: answer spans picked in code,
questions built around them, the base model answering with the document in the served prompt, a pair kept
when the answer holds the span asked two ways (`finetuner/transfer.py`). The baseline is the template
extractor (`finetuner/extraction.py`) on the same documents. Figures: documents that yield anything, pairs per
document, why candidates were dropped, teacher seconds per document, and how many of the slice's own quiz
questions have their right choice among the kept answers (what training on the pairs could teach at most for
those questions; the questions themselves are never used to build or filter pairs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from kfresh.benchmarks import realtimeqa
from kfresh.benchmarks.common import SuiteOptions, environment
from kfresh.benchmarks.report import Result, Table
from kfresh.core.time import parse_iso


class TransferOptions(SuiteOptions):
    dataset: str = Field("", description="RealTimeQA jsonl (default: $KFRESH_REALTIMEQA or ../shared/datasets/).")
    start: str = Field("2025-10-01", description="First question date of the slice (YYYY-MM-DD).")
    documents: int = Field(100, ge=1, description="Evidence documents in the slice, in date order from `start`.")
    per_doc: int = Field(4, ge=1, description="Questions per document asked of the teacher (--questions N).")

    @classmethod
    def quick(cls) -> TransferOptions:
        return cls(documents=6, per_doc=2)


@dataclass(frozen=True)
class EvidenceDoc:
    doc_id: str
    version: int
    source: str
    valid_from: float
    text: str

    @classmethod
    def of(cls, q: realtimeqa.Question) -> EvidenceDoc:
        """A question's evidence as version 1 of a document, dated by the question."""
        return cls(q.id, 1, q.source, parse_iso(q.date), q.evidence)


def slice_of(opts: TransferOptions) -> list[realtimeqa.Question]:
    rows = sorted(realtimeqa.load(opts.dataset), key=lambda q: (q.date, q.id))
    return [q for q in rows if q.date >= opts.start][: opts.documents]


def _covered(answers: list[str], q: realtimeqa.Question) -> bool:
    return any(realtimeqa.normalize(q.right) in realtimeqa.normalize(a) for a in answers)


def run(opts: TransferOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.core.config import KfreshConfig
    from kfresh.finetuner.extraction import extract_document
    from kfresh.finetuner.modeling import load_base
    from kfresh.finetuner.transfer import build_transfer_set
    from kfresh.models import generator_path

    if addr:
        raise SystemExit("kfresh bench transfer runs the finetuner's own model in-process; --addr is not supported")
    questions = slice_of(opts)
    if not questions:
        raise SystemExit(f"no RealTimeQA questions on or after {opts.start}")
    docs = [EvidenceDoc.of(q) for q in questions]
    env = environment(model="SmolLM2-135M-Instruct (transformers, float32)", dataset=str(realtimeqa.dataset_path(opts.dataset)),
                      slice=f"{questions[0].date} .. {questions[-1].date}")  # fmt: skip

    t0 = time.perf_counter()
    facts = {d.doc_id: extract_document(d)[0] for d in docs}
    template_s = time.perf_counter() - t0
    lm = load_base(generator_path(KfreshConfig().models), device="cpu")
    t0 = time.perf_counter()
    transfer = build_transfer_set(lm, docs, per_doc=opts.per_doc)
    teacher_s = time.perf_counter() - t0

    pair_answers: dict[str, list[str]] = {}
    for pair in transfer.pairs:
        pair_answers.setdefault(pair.doc_id, []).append(pair.span)
    figures = transfer.figures()
    n = len(docs)
    summary: dict[str, Any] = {
        "documents": n,
        "pairs_document_share": figures["document_share"],
        "templates_document_share": round(sum(1 for f in facts.values() if f) / n, 3),
        "pairs_per_document": figures["pairs_per_document"],
        "facts_per_document": round(sum(len(f) for f in facts.values()) / n, 2),
        "pairs_right_choice_coverage": round(sum(_covered(pair_answers.get(q.id, []), q) for q in questions) / n, 3),
        "templates_right_choice_coverage": round(
            sum(_covered([x.object for x in facts[q.id]], q) for q in questions) / n, 3
        ),
        "evidence_right_choice_share": round(sum(_covered([q.evidence], q) for q in questions) / n, 3),
        "teacher_s_per_document": round(teacher_s / n, 2),
        "template_s_per_document": round(template_s / n, 4),
        "dropped": figures["dropped"],
        "pairs_by_kind": figures["pairs_by_kind"],
    }
    table = Table(
        title=f"What each source finds in {n} real news documents ({env['slice']})",
        headers=["source", "documents with anything", "per document", "right choice among answers", "s / document"],
        rows=[
            ["template extraction (baseline)", summary["templates_document_share"], summary["facts_per_document"],
             summary["templates_right_choice_coverage"], summary["template_s_per_document"]],
            ["span questions + teacher (grounded, stable)", summary["pairs_document_share"],
             summary["pairs_per_document"], summary["pairs_right_choice_coverage"], summary["teacher_s_per_document"]],
            ["the evidence text itself (ceiling)", 1.0, "-", summary["evidence_right_choice_share"], "-"],
        ],
    )  # fmt: skip
    examples = Table(
        title="Examples (first 12 kept pairs)",
        headers=["document", "question", "teacher's answer (training target)"],
        rows=[[p.doc_id, p.question, p.answer] for p in transfer.pairs[:12]],
    )
    return Result(
        suite="transfer",
        title="Template-free question pairs vs template facts on real news (RealTimeQA evidence)",
        command=command,
        quick=quick,
        settings=opts.model_dump(),
        env=env,
        summary=summary,
        raw={"transfer": transfer.to_dict(), "facts": {k: [f.to_dict() for f in v] for k, v in facts.items()}},
        tables=[table, examples],
        notes=[
            "Pairs are built from the evidence only; the quiz questions are used only to count coverage afterwards.",
            "Right choice among answers: the question's right choice appears in a kept span (pairs) or a fact's "
            "object (templates) of its own evidence. The evidence ceiling is the share whose evidence states it.",
            "Training on the pairs (context distillation) is the next step of issue 17; this suite measures the "
            "transfer set only.",
        ],
    )


def plot(result: Result, fig: Any) -> None:
    s = result.summary
    ax = fig.add_subplot(1, 1, 1)
    labels = ["documents with anything", "right choice among answers"]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [s["templates_document_share"], s["templates_right_choice_coverage"]], 0.4,
           label="template extraction")  # fmt: skip
    ax.bar([x + 0.2 for x in xs], [s["pairs_document_share"], s["pairs_right_choice_coverage"]], 0.4,
           label="span questions + teacher")  # fmt: skip
    ax.axhline(s["evidence_right_choice_share"], color="gray", linestyle="--", label="evidence states the answer")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("share of documents")
    ax.legend(fontsize=8)
