"""Experiment: train an adapter on the template-free transfer set and ask the quiz questions closed-book.

    .venv/bin/python benchmarks/transfer_train.py [--pairs benchmarks/results/transfer-2026-12-06.json]
        [--epochs 3] [--budget 600] [--out benchmarks/results]

Reads the pairs a `kfresh bench transfer` run kept (RealTimeQA evidence, October-December: reporting data
nothing else trains on), trains a LoRA adapter on them with the default recipe (answer-only cross-entropy on
the teacher's answers, KL toward the base model on replay, the document-in-prompt examples), and asks the same
documents' quiz questions before and after: closed-book (what the weights learned) and with the evidence in the
prompt (the adapter must not hurt reading). The quiz questions are never trained on; the pair questions'
own closed-book recall is reported beside them (how much of the transfer set the weights took in).
This is the measurement behind issue 17's next step, not yet the distillation pipeline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from kfresh.benchmarks import realtimeqa
from kfresh.benchmarks.common import environment
from kfresh.benchmarks.report import Result, Table, write_result
from kfresh.benchmarks.transfer import EvidenceDoc, TransferOptions, slice_of
from kfresh.core.config import KfreshConfig
from kfresh.core.time import format_iso
from kfresh.finetuner.augment import QA, AugmentedFacts
from kfresh.finetuner.evaluate import adapter_disabled, contains_answer
from kfresh.finetuner.facts import Fact
from kfresh.finetuner.modeling import LoadedModel, chat_answers
from kfresh.finetuner.transfer import teacher_messages
from kfresh.prompt import closed_book_messages


def transfer_data(
    pairs: list[dict[str, Any]],
    docs: dict[str, EvidenceDoc],
    passage: str = "document",
    cloze: bool = False,
    target: str = "teacher",
) -> AugmentedFacts:
    """The pairs as the trainer's input: one pseudo-fact per pair (its span is what validation checks). `target`:
    the teacher's answer, or the span first and then the teacher's answer (the distillation default)."""
    from kfresh.finetuner.pairs import span_first

    facts = [Fact(p["question"], "question", p["span"], format_iso(docs[p["doc_id"]].valid_from), p["doc_id"],
                  p["version"], p["sentence"]) for p in pairs]  # fmt: skip
    answer = (lambda p: span_first(p["answer"], p["span"])) if target == "span-first" else (lambda p: p["answer"])
    train = [QA(p["question"], answer(p), i) for i, p in enumerate(pairs)]
    if cloze:
        train += [QA(_cloze(p), p["sentence"], i) for i, p in enumerate(pairs)]
    shown = {"document": lambda p: docs[p["doc_id"]].text, "sentence": lambda p: p["sentence"]}
    context = (
        [QA(p["question"], p["answer"], i, shown[passage](p)) for i, p in enumerate(pairs)] if passage in shown else []
    )
    return AugmentedFacts(facts, train, validation=list(train), heldout=[], context=context)


def _cloze(p: dict[str, Any]) -> str:
    from kfresh.finetuner.questions import cloze_for
    from kfresh.finetuner.spans import Span

    start = p["sentence"].index(p["span"])
    return cloze_for(p["sentence"], Span(p["span"], p["kind"], start, start + len(p["span"])))


def score(lm: LoadedModel, questions: list[realtimeqa.Question], pairs: list[dict[str, Any]],
          docs: dict[str, EvidenceDoc], desc: str) -> dict[str, float]:  # fmt: skip
    closed = chat_answers(lm, [closed_book_messages(q.question) for q in questions], max_new_tokens=48, desc=desc)
    reading = chat_answers(lm, [teacher_messages(docs[q.id], q.question) for q in questions], max_new_tokens=48,
                           desc=desc)  # fmt: skip
    recall = chat_answers(lm, [closed_book_messages(p["question"]) for p in pairs], max_new_tokens=32, desc=desc)
    cl = chat_answers(lm, [closed_book_messages(_cloze(p)) for p in pairs], max_new_tokens=32, desc=desc)
    n = len(questions)
    return {
        "pairs_cloze_recall": round(sum(contains_answer(a, [p["span"]]) for a, p in zip(cl, pairs)) / len(pairs), 3),
        "quiz_closed_book": round(sum(realtimeqa.is_right(a, q.choices, q.answer) for a, q in zip(closed, questions)) / n, 3),
        "quiz_with_evidence": round(sum(realtimeqa.is_right(a, q.choices, q.answer) for a, q in zip(reading, questions)) / n, 3),
        "pairs_closed_book_recall": round(sum(contains_answer(a, [p["span"]]) for a, p in zip(recall, pairs)) / len(pairs), 3),
    }  # fmt: skip


def plot(result: Result, fig: Any) -> None:
    before, after = result.summary["before"], result.summary["after"]
    keys = list(before)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in keys], 0.4, label="base model")
    ax.bar([x + 0.2 for x in xs], [after[k] for k in keys], 0.4, label="adapter trained on the pairs")
    ax.set_xticks(list(xs), keys, fontsize=8)
    ax.set_ylabel("share right")
    ax.legend(fontsize=8)


def main() -> None:
    from kfresh.finetuner.modeling import load_base, model_sha256
    from kfresh.finetuner.replay import build_pool
    from kfresh.finetuner.train import train_adapter
    from kfresh.models import generator_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=Path("benchmarks/results/transfer-2026-12-06.json"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=600.0, help="training wall-clock budget, seconds")
    parser.add_argument("--passage", choices=["document", "sentence", "none"], default="document")
    parser.add_argument("--cloze", action="store_true", help="train on the cloze phrasing too")
    parser.add_argument(
        "--target",
        choices=["teacher", "span-first"],
        default="teacher",
        help="training target: the teacher's answer, or the span first and then it",
    )
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    run = json.loads(args.pairs.read_text())
    pairs = run["raw"]["transfer"]["pairs"]
    questions = slice_of(TransferOptions.model_validate(run["settings"]))  # the slice the pairs were built from
    docs = {q.id: EvidenceDoc.of(q) for q in questions}

    cfg = KfreshConfig()
    ft = cfg.finetune.model_copy(update={"max_epochs": args.epochs, "time_budget_s": args.budget, "device": "cpu"})
    path = generator_path(cfg.models)
    lm = load_base(path, device="cpu")
    t0 = time.perf_counter()
    before = score(lm, questions, pairs, docs, "base")
    data = transfer_data(pairs, docs, args.passage, args.cloze, args.target)
    replay_n = args.epochs * len(data.train) + len(data.train)
    replay = build_pool(lm, Path(ft.work_dir) / "cache", model_sha256(path), limit=replay_n)
    with tempfile.TemporaryDirectory() as tmp:
        training = train_adapter(lm, data, replay, ft, Path(tmp) / "adapter")
    after = score(lm, questions, pairs, docs, "adapter")
    with adapter_disabled(lm):
        check = score(lm, questions[:10], pairs[:10], docs, "base again")
    rows = [[key, before[key], after[key]] for key in before]
    result = Result(
        suite="transfer-train", title="An adapter trained on the template-free pairs: the quiz asked before and after",
        command="python benchmarks/transfer_train.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        quick=False, settings={**vars(args), "pairs_file": str(args.pairs), "pairs": len(pairs), "documents": len(docs)},
        env=environment(model="SmolLM2-135M-Instruct (transformers, float32)"),
        summary={"before": before, "after": after, "training": training.to_dict(), "base_recheck_10": check,
                 "seconds": round(time.perf_counter() - t0, 1)},
        tables=[Table(f"{len(docs)} documents, {len(pairs)} pairs", ["figure", "base model", "adapter"], rows)],
        notes=["quiz_*: the slice's RealTimeQA questions (never trained on), scored right when the right choice "
               "and no other appears; pairs_closed_book_recall: the training questions themselves, closed-book."],
    )  # fmt: skip
    written = write_result(result, args.out, plot, tag=args.tag)
    print(json.dumps(result.summary, indent=1, default=str))
    print(f"wrote {written.json}, {written.markdown}")


if __name__ == "__main__":
    main()
