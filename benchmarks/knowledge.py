"""knowledge: fictional facts, some corrected later; accuracy closed-book vs retrieval vs a distilled adapter.

The shipped sample corpus (a fictional town; day 2 corrects the ferry timetable and the mayor) is
ingested with the real Indexer, then `run_distill` trains an adapter with whatever the finetuner's
CURRENT defaults are (only `stable_for_s` is 0: the documents were just written; --quick uses a tiny
budget). Then every setting answers the same HELD-OUT paraphrased questions (templates training never
saw), greedy, float32, with transformers + peft (finetuner/evaluate.py's machinery):
  (a) base model, closed-book        (b) base model + retrieval
  (c) adapter, closed-book           (d) adapter + retrieval
"With retrieval" is the server's own path: Indexer.search (k = answer.default_k), resolve_conflicts
(newest wins), build_messages. Corrected facts are the ones the day-1 versions that day 2 replaced (same id
upserted) or superseded stated with another object than the distilled facts (`corrections_from_history`,
with the finetuner's own extraction): they are scored on the NEW value, and an answer that gives an old value
but not the new one counts as stale. Retention: the gate's general questions (closed-book for a/c, with retrieval
for b/d) and general-text perplexity from the gate (base vs adapter). The adapter is evaluated whether or
not the gate would publish it; the gate's verdict is reported.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment
from kfresh.benchmarks.corrections import (
    correction_notes,
    corrections_from_history,
    pick_questions,
    sample_history,
)
from kfresh.benchmarks.report import Result, Table

CACHE = Path(".kfresh/bench-cache/distill-cache")
SETTINGS = [("a", "base, closed-book", False, False), ("b", "base + retrieval", False, True),
            ("c", "adapter, closed-book", True, False), ("d", "adapter + retrieval", True, True)]  # fmt: skip


class KnowledgeOptions(SuiteOptions):
    seed: int = Field(0, description="finetune.seed.")
    finetune: dict[str, Any] = Field(
        default_factory=dict, description="finetune.* overrides (empty = the current defaults)."
    )
    max_questions: int = Field(
        0,
        ge=0,
        description="Held-out questions evaluated (0 = all; fewer: one per fact in turn, corrected facts first).",
    )
    max_general: int = Field(0, ge=0, description="General questions evaluated (0 = all).")

    @classmethod
    def quick(cls) -> KnowledgeOptions:
        """A tiny run that learns only the two corrected documents' template facts (the ferry's 5 facts and the
        mayor), so its six questions include corrected facts; the full run learns every document, question pairs
        included."""
        corrected_sources = ["port-avel-transit/*", "port-avel-council/*"]
        return cls(finetune={"max_epochs": 1, "time_budget_s": 20, "max_facts": 6, "warmup_steps": 1,
                             "trusted_sources": corrected_sources, "questions_per_doc": 0},
                   max_questions=6, max_general=4)  # fmt: skip


def share_cache(src: Path, dst: Path) -> int:
    """Copy the finetuner's cache files (base-model replay outputs and general figures, keyed by model and data
    hashes) between runs; returns how many were copied."""
    import shutil

    if not src.is_dir():
        return 0
    dst.mkdir(parents=True, exist_ok=True)
    files = [f for f in src.iterdir() if f.is_file()]
    for f in files:
        shutil.copy2(f, dst / f.name)
    return len(files)


def suite_config(home: Path, *, seed: int, finetune: dict[str, Any]) -> Any:
    """The finetuner's current defaults in a fresh home, with `stable_for_s` 0 (the documents were just written)."""
    from kfresh.core.config import KfreshConfig

    data = KfreshConfig().with_home(home).model_dump()
    data["models"]["cache_dir"] = str(KfreshConfig().models.cache_dir.resolve())
    data["finetune"].update(stable_for_s=0.0, seed=seed, **finetune)
    return KfreshConfig.model_validate(data)


def _asks(cfg: Any, data: Any, stale: dict[tuple[str, str], set[str]], opts: KnowledgeOptions) -> list[dict[str, Any]]:
    """Every question with its closed-book and retrieval messages, expected value and stale values."""
    from kfresh.finetuner import datasets
    from kfresh.finetuner.pairs import is_pair
    from kfresh.indexer.service import Indexer
    from kfresh.prompt import build_messages, closed_book_messages, resolve_conflicts

    corrected = {i for i, f in enumerate(data.facts) if f.key in stale}
    heldout = pick_questions(data.heldout, corrected, opts.max_questions)
    general = datasets.general_questions()[: opts.max_general or None]
    rows = []
    with Indexer(cfg) as ix:

        def rag(question: str) -> list[dict[str, str]]:
            hits = ix.search(question, cfg.answer.default_k, with_vectors=True)
            kept = resolve_conflicts(hits, similarity=cfg.answer.conflict_similarity, min_score=cfg.answer.min_score,
                                     score_margin=cfg.answer.score_margin).kept  # fmt: skip
            return build_messages(question, kept)

        for qa in heldout:
            key = data.facts[qa.fact].key
            old = sorted(stale.get(key, set()))
            kind = "pair" if is_pair(data.facts[qa.fact]) else "fact"  # pairs: the cloze of a question pair
            rows.append({"kind": kind, "about": list(key), "question": qa.question, "expected": [qa.answer], "stale": old,
                         "corrected": bool(old), "closed": closed_book_messages(qa.question), "rag": rag(qa.question)})  # fmt: skip
        for g in general:
            rows.append({"kind": "general", "about": None, "question": g.question, "expected": list(g.answers), "stale": [],
                         "corrected": False, "closed": closed_book_messages(g.question), "rag": rag(g.question)})  # fmt: skip
    return rows


def evaluate(cfg: Any, adapter_dir: Path, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Answers of the four settings to every row (one batched greedy pass per setting)."""
    from peft import PeftModel

    from kfresh.finetuner.evaluate import MAX_NEW_TOKENS, adapter_disabled
    from kfresh.finetuner.modeling import chat_answers, load_base, resolve_device
    from kfresh.models import generator_path

    lm = load_base(generator_path(cfg.models), device=resolve_device(cfg.finetune.device))
    lm.model = PeftModel.from_pretrained(lm.model, str(adapter_dir))
    lm.model.eval()
    answers: dict[str, list[str]] = {}
    for key, label, use_adapter, use_rag in SETTINGS:
        convs = [r["rag"] if use_rag else r["closed"] for r in rows]
        if use_adapter:
            answers[key] = chat_answers(lm, convs, max_new_tokens=MAX_NEW_TOKENS, desc=label)
        else:
            with adapter_disabled(lm):
                answers[key] = chat_answers(lm, convs, max_new_tokens=MAX_NEW_TOKENS, desc=label)
    return answers


def score(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """Accuracies per kind of question (corrected = questions about corrected facts, on the new value) and the
    stale answers: ones that give an old value but not the new one (an answer naming both is not stale)."""
    from kfresh.finetuner.evaluate import contains_answer

    def acc(pick: Any) -> tuple[float | None, int]:
        idx = [i for i, r in enumerate(rows) if pick(r)]
        ok = sum(contains_answer(answers[i], rows[i]["expected"]) for i in idx)
        return (round(ok / len(idx), 4) if idx else None), len(idx)

    facts, n_facts = acc(lambda r: r["kind"] == "fact")
    corrected, n_corr = acc(lambda r: r["corrected"])
    unchanged, n_unch = acc(lambda r: r["kind"] == "fact" and not r["corrected"])
    general, n_gen = acc(lambda r: r["kind"] == "general")
    pairs, n_pairs = acc(lambda r: r["kind"] == "pair")
    stale = sum(1 for r, a in zip(rows, answers)
                if r["stale"] and contains_answer(a, r["stale"]) and not contains_answer(a, r["expected"]))  # fmt: skip
    return {"facts": facts, "facts_n": n_facts, "corrected": corrected, "corrected_n": n_corr, "unchanged": unchanged,
            "unchanged_n": n_unch, "stale_answers": stale, "general": general, "general_n": n_gen,
            "pairs": pairs, "pairs_n": n_pairs}  # fmt: skip


def run(opts: KnowledgeOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.benchmarks.distill import ingest_samples
    from kfresh.finetuner.distill import run_distill

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = environment(dtype="float32 (transformers + peft)")
    with tempfile.TemporaryDirectory(prefix="kfresh-bench-knowledge-") as tmp:
        cfg = suite_config(Path(tmp), seed=opts.seed, finetune=opts.finetune)
        docs = ingest_samples(cfg)
        warm = share_cache(CACHE, Path(cfg.finetune.work_dir) / "cache")
        started = time.perf_counter()
        distilled = run_distill(cfg)
        distill_s = time.perf_counter() - started
        share_cache(Path(cfg.finetune.work_dir) / "cache", CACHE)
        if distilled.data is None or not distilled.data.heldout or not (distilled.run_dir / "adapter").is_dir():
            raise RuntimeError(f"distillation produced no adapter to evaluate (status {distilled.status})")
        history = sample_history()
        stale = corrections_from_history(history.replaced, distilled.data.facts)
        rows = _asks(cfg, distilled.data, stale, opts)
        started = time.perf_counter()
        answers = evaluate(cfg, distilled.run_dir / "adapter", rows)
        eval_s = time.perf_counter() - started
        report = json.loads((distilled.run_dir / "gate-report.json").read_text())
    scores = {key: score(rows, answers[key]) for key, *_ in SETTINGS}
    return _result(opts, quick, command, cfg=cfg, docs=docs, distilled=distilled, report=report, rows=rows, answers=answers,
                   scores=scores, stale=stale, correction_notes=correction_notes(history, distilled.data.facts, stale, rows),
                   timings={"distill_s": round(distill_s, 1), "evaluate_s": round(eval_s, 1), **distilled.timings,
                            "replay_cache_files_reused": warm},
                   addr=addr, env=env)  # fmt: skip


def _result(opts: KnowledgeOptions, quick: bool, command: str, **m: Any) -> Result:
    fig = m["distilled"].figures
    ppl = {
        "a": fig.get("perplexity_before"),
        "b": fig.get("perplexity_before"),
        "c": fig.get("perplexity_after"),
        "d": fig.get("perplexity_after"),
    }
    raw_rows = [{k: v for k, v in r.items() if k not in ("closed", "rag")} | {s: m["answers"][s][i] for s, *_ in SETTINGS}
                for i, r in enumerate(m["rows"])]  # fmt: skip
    result = Result(
        suite="knowledge", title="Knowledge: closed-book, retrieval, distilled adapter, both (held-out paraphrases)", command=command,
        quick=quick, settings={**opts.model_dump(), "finetune_effective": m["cfg"].finetune.model_dump(mode="json")},
        env={**m["env"], "model": m["cfg"].models.generator, "documents": m["docs"]},
        raw={"rows": raw_rows, "gate": {"passed": m["distilled"].passed, "status": m["distilled"].status,
                                        "checks": m["report"].get("checks", [])}, "timings": m["timings"],
             "stale_values": {" / ".join(key): sorted(old) for key, old in sorted(m["stale"].items())}},
    )  # fmt: skip
    s = m["scores"]
    result.summary = {key: {**s[key], "perplexity": ppl[key]} for key, *_ in SETTINGS}
    result.summary["gate_passed"] = m["distilled"].passed
    result.summary["facts"] = fig.get("facts")
    result.tables.append(Table(
        f"{s['a']['facts_n']} held-out questions about {fig.get('facts')} facts ({s['a']['corrected_n']} about corrected facts); "
        f"{s['a']['general_n']} general questions",
        ["setting", "all facts", "corrected facts (new value)", "stale answers (old value)", "unchanged facts", "general questions",
         "general-text perplexity", f"question pairs from any text ({s['a']['pairs_n']} clozes)"],
        [[f"({key}) {label}", s[key]["facts"], s[key]["corrected"], s[key]["stale_answers"], s[key]["unchanged"], s[key]["general"],
          ppl[key], s[key]["pairs"]] for key, label, *_ in SETTINGS],
    ))  # fmt: skip
    result.notes += [
        f"Adapter from run_distill with the current finetune defaults{' plus ' + json.dumps(opts.finetune) if opts.finetune else ''}; "
        f"gate {'passed' if m['distilled'].passed else 'REJECTED'} it (status {m['distilled'].status}); it is evaluated either way.",
        f"Timings (s): {m['timings']}.",
        "Perplexity is the gate's figure on the shipped general texts (the same weights for a/b and for c/d).",
        *m["correction_notes"],
    ]
    if m.get("addr"):
        result.notes.append("--addr is ignored: this suite evaluates model weights in-process.")
    return result


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    ax1, ax2 = series_axes(fig, 2)
    keys = [k for k, *_ in SETTINGS]
    labels = [f"({k}) {label}" for k, label, *_ in SETTINGS]
    width = 0.25
    for j, (field, name) in enumerate(
        (("facts", "held-out facts"), ("corrected", "corrected facts"), ("general", "general questions"))
    ):
        ax1.bar(
            [i + (j - 1) * width for i in range(4)], [result.summary[k][field] or 0 for k in keys], width, label=name
        )
    ax1.set_xticks(range(4), labels, fontsize=7, rotation=15)
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=7)
    ax2.bar(range(4), [result.summary[k]["stale_answers"] for k in keys])
    ax2.set_xticks(range(4), labels, fontsize=7, rotation=15)
    ax2.set_ylabel("answers giving the superseded value")
