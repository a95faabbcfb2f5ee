"""One distillation run: select -> extract + ask -> augment -> replay -> train -> gate -> publish (if it passed).

Everything a run produces lands in its own folder under `finetune.work_dir/runs/` (extraction record,
facts, adapter, gate-report.json/.md), so a rejected adapter can be inspected. Only a gate-passing
adapter reaches the registry, with its facts.jsonl and gate report inside the adapter folder: the next
run reads the facts back to keep them (retention) and the server never sees an ungated adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfresh.core.config import KfreshConfig
from kfresh.finetuner import datasets
from kfresh.finetuner.augment import AugmentedFacts, augment
from kfresh.finetuner.evaluate import Figures, Score, measure, score_from_dict
from kfresh.finetuner.extraction import Excluded
from kfresh.finetuner.facts import FACTS_FILE, Fact, read_facts, write_facts
from kfresh.finetuner.gate import GateReport, build_report, write_report
from kfresh.finetuner.plan import Plan, plan_knowledge
from kfresh.finetuner.registry import AdapterManifest, AdapterRegistry
from kfresh.finetuner.selection import SelectedDoc
from kfresh.finetuner.transfer import TransferSet

log = logging.getLogger("kfresh.finetuner")


@dataclass
class DistillResult:
    """status: 'dry_run' | 'nothing_new' | 'published' | 'rejected'.

    A run with no new facts still trains when facts the served adapter knew were removed (deleted or
    updated documents): the replacement adapter must not carry them.
    """

    status: str
    run_dir: Path
    passed: bool
    facts: list[Fact]
    new_facts: list[Fact]
    carried_facts: list[Fact]
    excluded: list[Excluded]
    skipped_documents: dict[str, str]
    data: AugmentedFacts | None = None
    report_path: Path | None = None
    manifest: AdapterManifest | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    transfer: TransferSet | None = None  # the question pairs built this run (what was kept, what dropped and why)


def run_distill(
    cfg: KfreshConfig,
    *,
    dry_run: bool = False,
    facts_override: list[Fact] | None = None,
    questions_per_doc: int | None = None,
) -> DistillResult:
    """Distil validated knowledge into a gated LoRA adapter; publish it only if the gate passes.

    With `questions_per_doc` > 0 (default `finetune.questions_per_doc`, 0 = off), every selected document is asked
    up to that many questions without templates (span-picked, answered by the base model reading the document,
    `finetuner.transfer`); the kept pairs are learned beside the template facts. A dry run shows them. With
    `finetune.require_review`, new candidates go to the review queue and only approved ones are learned.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    ft = cfg.finetune
    per_doc = ft.questions_per_doc if questions_per_doc is None else questions_per_doc
    run_dir = _new_run_dir(Path(ft.work_dir))
    registry = AdapterRegistry(Path(ft.registry_dir))
    current = registry.current()
    previous = read_facts(registry.adapter_dir(current.version) / FACTS_FILE) if current else []
    teacher = _Teacher(cfg, per_doc, run_dir, timings)
    review = _Review(cfg, teacher) if ft.require_review else None
    try:
        plan = plan_knowledge(cfg, previous=previous, facts_override=facts_override, record_dir=run_dir,
                              ask=teacher.ask if per_doc > 0 else None, admit=review.admit if review else None)  # fmt: skip
    finally:
        if review is not None:
            review.close()
    data = augment(plan.facts)
    timings["plan_s"] = round(time.perf_counter() - clock, 3)
    result = _result("dry_run", run_dir, plan, data, timings)
    result.transfer = teacher.transfer
    if dry_run:
        return result
    if not plan.facts or not (plan.new or plan.removed):
        if plan.removed:  # everything the served adapter knew is gone: only a rollback can unlearn it
            log.warning("distill.all_facts_removed removed=%d: roll the served adapter back", len(plan.removed))
        log.info("distill.nothing_new facts=%d", len(plan.facts))
        result.status = "nothing_new"
        return result
    report, base_sha, replay = _train_and_gate(cfg, plan, data, run_dir, timings, lm=teacher.lm)
    result.status, result.passed, result.report_path = "rejected", report.passed, run_dir / "gate-report.json"
    result.figures = {**result.figures, **report.figures()}
    if report.passed:
        result.manifest = registry.publish(
            run_dir / "adapter",
            base_model=cfg.models.generator,
            base_model_sha256=base_sha,
            training_data_sha256=training_data_sha256(data, replay),
            gate_passed=True,
            metrics=result.figures,
            facts=len(plan.facts),
            notes=f"{len(plan.new)} new + {len(plan.carried)} kept facts from {len(plan.docs)} documents",
            promote=True,
        )
        result.status = "published"
    timings["total_s"] = round(time.perf_counter() - clock, 3)
    log.info("distill.done status=%s passed=%s timings=%s", result.status, result.passed, timings)
    return result


def _train_and_gate(
    cfg: KfreshConfig, plan: Plan, data: AugmentedFacts, run_dir: Path, timings: dict[str, float], *, lm: Any = None
) -> tuple[GateReport, str, list[Any]]:
    """Measure the base, train, measure the adapter, write the gate report and the adapter's facts (`lm`: the base
    model when the teacher already loaded it)."""
    from kfresh.finetuner.modeling import load_base, model_sha256, resolve_device
    from kfresh.finetuner.replay import build_pool
    from kfresh.finetuner.train import train_adapter
    from kfresh.models import generator_path

    ft = cfg.finetune
    step = time.perf_counter()
    path = generator_path(cfg.models)
    base_sha = model_sha256(path)
    lm = lm if lm is not None else load_base(path, device=resolve_device(ft.device))
    cache = Path(ft.work_dir) / "cache"
    replay = build_pool(lm, cache, base_sha, limit=_replay_needed(cfg, len(data.train))) if ft.kl_weight > 0 else []
    timings["load_and_replay_s"] = round(time.perf_counter() - step, 3)

    step = time.perf_counter()
    new_data = augment(plan.new)
    old_data = augment(plan.carried) if plan.carried else None
    before = measure(lm, new_data, old_data, desc="gate: base model", cached_general=_base_general(cache, base_sha))
    _save_base_general(cache, base_sha, before)
    timings["eval_base_s"] = round(time.perf_counter() - step, 3)

    training = train_adapter(lm, data, replay, ft, run_dir / "adapter")
    timings["train_s"] = training.seconds

    step = time.perf_counter()
    after = measure(lm, new_data, old_data, desc="gate: adapter")
    timings["eval_adapter_s"] = round(time.perf_counter() - step, 3)
    report = build_report(ft, before, after, has_previous=old_data is not None, extraction=plan.extraction,
                          training=training.to_dict(), facts=len(plan.facts))  # fmt: skip
    json_path, _ = write_report(report, run_dir)
    write_facts(run_dir / "adapter" / FACTS_FILE, plan.facts)
    shutil.copy2(json_path, run_dir / "adapter" / "gate-report.json")
    return report, base_sha, list(replay)


class _Teacher:
    """Asks documents their questions (`plan_knowledge`'s `ask`): loads the base model once, on first use, and
    keeps it for training; records the transfer set in the run folder."""

    def __init__(self, cfg: KfreshConfig, per_doc: int, run_dir: Path, timings: dict[str, float]) -> None:
        self.cfg, self.per_doc, self.run_dir, self.timings = cfg, per_doc, run_dir, timings
        self.lm: Any = None
        self.transfer: TransferSet | None = None

    def model(self) -> Any:
        """The base model, loaded on first use."""
        from kfresh.finetuner.modeling import load_base, resolve_device
        from kfresh.models import generator_path

        if self.lm is None:
            self.lm = load_base(generator_path(self.cfg.models), device=resolve_device(self.cfg.finetune.device))
        return self.lm

    def ask(self, docs: Sequence[SelectedDoc]) -> list[Fact]:
        from kfresh.finetuner.transfer import build_transfer_set

        step = time.perf_counter()
        logged = self._logged_questions(docs)
        self.transfer = (
            build_transfer_set(self.model(), docs, per_doc=self.per_doc, logged=logged) if docs else TransferSet(0)
        )
        (self.run_dir / "transfer.json").write_text(json.dumps(self.transfer.to_dict(), indent=1, ensure_ascii=False))
        self.timings["transfer_s"] = round(time.perf_counter() - step, 3)
        return self.transfer.as_facts(docs)

    def _logged_questions(self, docs: Sequence[SelectedDoc]) -> dict[tuple[str, int], list[str]]:
        """Questions real answers asked of these versions (the answer log), when the store exists."""
        from kfresh.indexer.stores import open_store, store_exists

        if not docs or not store_exists(self.cfg.store):
            return {}
        with open_store(self.cfg.store, read_only=True) as store:
            return store.logged_questions([(d.doc_id, d.version) for d in docs])


class _Review:
    """`plan_knowledge`'s `admit` under `finetune.require_review`: offers the run's new candidates to the review queue
    (with whether the base model answers each wrong closed-book, and how often answers cited its document) and
    admits only the approved ones."""

    def __init__(self, cfg: KfreshConfig, teacher: _Teacher) -> None:
        from kfresh.finetuner.review import QUEUE_FILE, ReviewQueue

        self.cfg, self.teacher = cfg, teacher
        self.queue = ReviewQueue(Path(cfg.finetune.work_dir) / QUEUE_FILE)

    def admit(self, facts: list[Fact]) -> list[Fact]:
        from kfresh.finetuner.review import item_key
        from kfresh.indexer.stores import open_store, store_exists

        fresh = self.queue.unqueued(facts)
        cited: dict[tuple[str, int], int] = {}
        if fresh and store_exists(self.cfg.store):
            with open_store(self.cfg.store, read_only=True) as store:
                cited = store.citation_counts()
        wrong = {item_key(f) for f, ok in zip(fresh, self._closed_book_right(fresh)) if not ok}
        added = self.queue.offer(fresh, base_wrong=wrong, cited=cited)
        admitted = self.queue.approved(facts)
        log.info("review.admit candidates=%d queued=%d approved=%d", len(facts), added, len(admitted))
        return admitted

    def _closed_book_right(self, facts: list[Fact]) -> list[bool]:
        from kfresh.finetuner.augment import questions
        from kfresh.finetuner.evaluate import contains_answer
        from kfresh.finetuner.modeling import chat_answers
        from kfresh.finetuner.pairs import is_pair
        from kfresh.prompt import closed_book_messages

        if not facts:
            return []
        asked = [f.subject if is_pair(f) else questions(f.subject, f.relation, "train")[0] for f in facts]
        answers = chat_answers(self.teacher.model(), [closed_book_messages(q) for q in asked], max_new_tokens=32,
                               desc="review: closed-book")  # fmt: skip
        return [contains_answer(a, [f.object]) for a, f in zip(answers, facts)]

    def close(self) -> None:
        self.queue.close()


def training_data_sha256(data: AugmentedFacts, replay: Sequence[Any]) -> str:
    rows = {
        "facts": [f.to_dict() for f in data.facts],
        "train": [[qa.question, qa.answer] for qa in data.train],
        "replay": [[r.kind, r.prompt, r.completion] for r in replay],
    }
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _result(status: str, run_dir: Path, plan: Plan, data: AugmentedFacts, timings: dict[str, float]) -> DistillResult:
    return DistillResult(
        status=status, run_dir=run_dir, passed=False, facts=plan.facts, new_facts=plan.new,
        carried_facts=plan.carried, excluded=plan.excluded, skipped_documents=plan.skipped_docs, data=data,
        figures={"facts": len(plan.facts), "new_facts": len(plan.new), "carried_facts": len(plan.carried),
                 "removed_facts": len(plan.removed), "train_examples": len(data.train), "heldout_questions": len(data.heldout),
                 "extraction": asdict(plan.extraction) if plan.extraction else None},
        timings=timings,
    )  # fmt: skip


def _new_run_dir(work_dir: Path) -> Path:
    runs = work_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))


def _replay_needed(cfg: KfreshConfig, train_examples: int) -> int:
    """Replay sequences the longest possible run can use (a tiny run need not generate the whole pool)."""
    ft = cfg.finetune
    return ft.max_epochs * math.ceil(train_examples / ft.batch_size) * ft.batch_size


def _base_cache_path(cache: Path, base_sha: str) -> Path:
    return cache / f"base-general-{base_sha[:16]}-{datasets.data_sha256()[:16]}.json"


def _base_general(cache: Path, base_sha: str) -> tuple[Score, float] | None:
    """The base model's general accuracy and perplexity do not depend on the facts: computed once."""
    path = _base_cache_path(cache, base_sha)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return score_from_dict(data["general"]), float(data["perplexity"])


def _save_base_general(cache: Path, base_sha: str, figures: Figures) -> None:
    path = _base_cache_path(cache, base_sha)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"general": asdict(figures.general), "perplexity": figures.perplexity}))
