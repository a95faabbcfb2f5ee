"""conflicts: which passage the model is shown when stories disagree, per conflict setting, without the generator.

The answer step's own selection (`server/reading.select`: rerank the pool, keep k, resolve conflicts, keep
`answer.prompt_passages`) over an exact cosine search of the real MiniLM vectors, one chunk per passage, for
each value of `answer.named_conflict_similarity` (1.01 = off, the similarity rule alone). Two sets:
- corrections (benchmarks/data/corrections.jsonl, the `newest_wins` pairs, the "separate" way): every story
  and, a day later, its unlinked correction in one index; right = the correction is shown and the story not;
- RealTimeQA (../shared/datasets/realtimeqa-2025.jsonl): every evidence passage dated by its question, each
  question of a period asked; right = the question's evidence is shown, and the share whose shown passage
  holds the right choice (the model can only be right from it). A newer story on the same subject that is
  not a correction costs here: the price of the rule on real news.
The default was chosen on January-September and the "here" pairs; October-December and the "blind" pairs
are reported beside them. What the model then says is measured by `newest_wins` and `reading`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from kfresh.benchmarks import realtimeqa
from kfresh.benchmarks.common import SuiteOptions, environment
from kfresh.benchmarks.newest_wins import DAY, DAY1, load_pairs
from kfresh.benchmarks.report import Result, Table, grouped_bars

WHEN = ("now", "then")
"""now: every 2025 passage is in the index (later weeks' stories are newer neighbours); then: each question sees
only the passages dated up to its own date, as if asked when it was news."""


class ConflictsOptions(SuiteOptions):
    dataset: str = Field(
        "", description="Path of realtimeqa-2025.jsonl (default $KFRESH_REALTIMEQA or ../shared/datasets/)."
    )
    named_similarities: list[float] = Field(
        default_factory=lambda: [1.01, 0.5, 0.45, 0.4, 0.35],
        description="Values of answer.named_conflict_similarity compared (1.01 = off).",
    )
    periods: list[realtimeqa.Period] = Field(
        default_factory=lambda: list[realtimeqa.Period](["dev", "test"]),
        description="RealTimeQA periods asked (dev = Jan-Sep, test = Oct-Dec).",
    )
    sample: int = Field(0, ge=0, description="A fixed spread-out sample of this many questions per period (0 = all).")

    @classmethod
    def quick(cls) -> ConflictsOptions:
        return cls(named_similarities=[1.01, 0.4], sample=20)


class _Exact:
    """An exact cosine search over unit vectors, returning the server's Hit objects."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], dates: Sequence[float], vectors: np.ndarray) -> None:
        self.ids, self.texts, self.dates, self.vectors = list(ids), list(texts), list(dates), vectors

    def search(self, query: np.ndarray, k: int, until: float | None = None) -> list[Any]:
        """The best k by cosine; with `until`, among the passages dated up to then only."""
        from kfresh.indexer.documents import Hit

        scores = self.vectors @ query
        if until is not None:
            scores = np.where(np.asarray(self.dates) <= until, scores, -np.inf)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(doc_id=self.ids[i], version=1, chunk_id=int(i), ordinal=0, text=self.texts[i],
                    score=float(scores[i]), source="", valid_from=self.dates[i], metadata={},
                    vector=self.vectors[i]) for i in order]  # fmt: skip


def _shown(index: _Exact, questions: Sequence[str], qvecs: np.ndarray, cfg: Any,
           until: Sequence[float | None] | None = None) -> list[list[Any]]:  # fmt: skip
    from kfresh.server import reading

    pool = reading.fetch_size(0, cfg, max_k=len(index.ids))
    until = until or [None] * len(questions)
    return [reading.select(q, index.search(v, pool, t), cfg.default_k, cfg)[0]
            for q, v, t in zip(questions, qvecs, until, strict=True)]  # fmt: skip


def run(opts: ConflictsOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.client.sources import parse_time
    from kfresh.core.config import AnswerConfig, KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    if addr:
        raise SystemExit("kfresh bench conflicts runs the answer step's selection in-process; it takes no --addr")
    started = time.perf_counter()
    encode = create_embedder(KfreshConfig()).encode
    pairs = [p for p in load_pairs() if p.set in ("here", "blind")]
    n = len(pairs)
    fixes = _Exact([f"story-{i}" for i in range(n)] + [f"fix-{i}" for i in range(n)],
                   [p.first for p in pairs] + [p.correction for p in pairs],
                   [DAY1] * n + [DAY1 + DAY] * n, encode([p.first for p in pairs] + [p.correction for p in pairs]))  # fmt: skip
    pair_q = encode([p.question for p in pairs])
    corpus = realtimeqa.load(opts.dataset)
    day = {q.id: float(parse_time(q.date, q.id) or 0.0) for q in corpus}  # load() checked every date
    news = _Exact([q.id for q in corpus], [q.evidence for q in corpus], [day[q.id] for q in corpus],
                  encode([q.evidence for q in corpus]))  # fmt: skip
    asked = {p: realtimeqa.sample(realtimeqa.period(corpus, p), opts.sample) for p in opts.periods}
    asked_vecs = {p: encode([q.question for q in qs]) for p, qs in asked.items()}
    raw: dict[str, Any] = {"pairs": {}, "news": {}}
    for value in opts.named_similarities:
        cfg = AnswerConfig(named_conflict_similarity=value)
        shown = _shown(fixes, [p.question for p in pairs], pair_q, cfg)
        raw["pairs"][str(value)] = [{"set": p.set, "shown": [h.doc_id for h in s]} for p, s in zip(pairs, shown)]
        raw["news"][str(value)] = {}
        for period, qs in asked.items():
            for when in WHEN:
                until: list[float | None] | None = [day[q.id] for q in qs] if when == "then" else None
                shown = _shown(news, [q.question for q in qs], asked_vecs[period], cfg, until)
                raw["news"][str(value)][f"{period}/{when}"] = [
                    {"id": q.id, "shown": [h.doc_id for h in s],
                     "holds_answer": any(realtimeqa.is_right(h.text, q.choices, q.answer) for h in s)}
                    for q, s in zip(qs, shown)
                ]  # fmt: skip
    raw["wall_s"] = time.perf_counter() - started
    return build_result(raw, opts, quick=quick, command=command, env=environment(embedder="all-MiniLM-L6-v2"))


def build_result(raw: dict[str, Any], opts: ConflictsOptions, *, quick: bool, command: str,
                 env: dict[str, Any]) -> Result:  # fmt: skip
    result = Result(suite="conflicts", title="Conflicts: the passage shown when stories disagree (no generator)",
                    command=command, quick=quick, settings=opts.model_dump(), env=env, raw=raw)  # fmt: skip
    from kfresh.core.config import AnswerConfig

    default = AnswerConfig().named_conflict_similarity
    rows = []
    for value in opts.named_similarities:
        key = str(value)
        row: list[Any] = [f"{value}{' (off)' if value > 1 else ''}{' (default)' if value == default else ''}"]
        for name in ("here", "blind"):
            got = [a for a in raw["pairs"][key] if a["set"] == name]
            right = sum(a["shown"] == [f"fix-{i}"] for i, a in enumerate(raw["pairs"][key]) if a["set"] == name)
            row.append(f"{right}/{len(got)}")
            result.summary[f"fix_shown_{name}_{key}"] = right / len(got) if got else None
        for period in opts.periods:
            for when in WHEN:
                got = raw["news"][key][f"{period}/{when}"]
                evidence = sum(a["id"] in a["shown"] for a in got) / len(got) if got else 0.0
                holds = sum(a["holds_answer"] for a in got) / len(got) if got else 0.0
                row += [f"{evidence:.3f}", f"{holds:.3f}"]
                result.summary[f"evidence_shown_{period}_{when}_{key}"] = evidence
                result.summary[f"holds_answer_{period}_{when}_{key}"] = holds
        rows.append(row)
    header = ["named_conflict_similarity", "correction shown alone (here)", "(blind)"]
    for period in opts.periods:
        size = len(raw["news"][str(opts.named_similarities[0])][f"{period}/now"])
        for when in WHEN:
            header += [f"{period} {when}: evidence shown ({size} q)", f"{period} {when}: holds the answer"]
    result.tables.append(Table("Shown passages, default answer settings otherwise", header, rows))
    result.notes += [
        "Pairs: the newest_wins stories and their corrections, no link between them, the correction a day newer; "
        "all 22 pairs share one index, so the other stories are the distractors.",
        "RealTimeQA: every evidence passage of the file is a document dated by its question (one chunk each; "
        "they average 34 words). now: all of them in the index, so a question's evidence has newer neighbours "
        "from later weeks (the reading suite's setting); then: each question sees the passages dated up to its "
        "own date only, as if asked when it was news.",
        "Chosen on dev (January-September) and the 'here' pairs; test (October-December) and 'blind' were not "
        "used to choose.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    values = [str(v) for v in result.settings["named_similarities"]]
    series = [("corrections (blind)", [result.summary.get(f"fix_shown_blind_{v}") or 0.0 for v in values])]
    series += [(f"{p} {w}: evidence shown", [result.summary.get(f"evidence_shown_{p}_{w}_{v}") or 0.0 for v in values])
               for p in result.settings["periods"] for w in WHEN]  # fmt: skip
    grouped_bars(ax, values, series)
    ax.set_xlabel("answer.named_conflict_similarity")
    ax.set_ylim(0, 1)
