"""The gate: an adapter is published only if it learned the new facts and harmed nothing measurable.

Checks (thresholds from FinetuneConfig): held-out closed-book recall of the new facts (template facts and
question pairs from any text apart: a pair's held-out phrasing is the cloze of its sentence); recall of the
previous adapter's still-valid facts; general-question accuracy and general-text perplexity against the
BASE model (not the current adapter, so small losses cannot accumulate version after version); and
retrieval + adapter >= retrieval alone, both with the fact's own document as the passage and with a
newer passage that contradicts the trained value (the answer must follow the passage). Extraction F1
against reviewed gold facts must reach `min_extraction_f1` where the documents have gold facts. The
report is written as JSON and Markdown whether the adapter passes or not.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfresh.core.config import FinetuneConfig
from kfresh.finetuner.evaluate import Figures
from kfresh.finetuner.extraction import PRF


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: str
    detail: str = ""


@dataclass
class GateReport:
    passed: bool
    checks: list[Check]
    before: dict[str, Any]
    after: dict[str, Any]
    extraction: dict[str, Any] | None
    training: dict[str, Any]
    facts: int
    created_at: float = field(default_factory=time.time)
    samples: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """Flat before/after figures: what the registry manifest and the CLI show."""
        out: dict[str, Any] = {"gate_passed": self.passed, "facts": self.facts}
        for key, value in self.before.items():
            out[f"{key}_before"] = value
        for key, value in self.after.items():
            out[f"{key}_after"] = value
        if self.extraction:
            out["extraction_f1"] = self.extraction["f1"]
        for key in ("seconds", "steps", "stopped", "best_epoch"):
            if key in self.training:
                out[f"train_{key}"] = self.training[key]
        return out


def judge(cfg: FinetuneConfig, before: Figures, after: Figures, *, has_previous: bool) -> list[Check]:
    if after.new_facts.total:
        new = _at_least("new_facts_recall", after.new_facts.accuracy, cfg.min_new_recall)
    else:
        new = Check(
            "new_facts_recall", True, None, f">= {cfg.min_new_recall}", "no new facts: this run only drops removed ones"
        )
    checks = [
        new,
        _drop("general_accuracy", before.general.accuracy, after.general.accuracy, cfg.max_general_drop),
        _rise("perplexity", before.perplexity, after.perplexity, cfg.max_perplexity_increase),
    ]
    if has_previous and after.previous_facts.total:
        checks.append(_at_least("previous_facts_recall", after.previous_facts.accuracy, cfg.min_previous_recall))
    else:
        checks.append(
            Check(
                "previous_facts_recall",
                True,
                None,
                f">= {cfg.min_previous_recall}",
                "no previous adapter facts to keep",
            )
        )
    checks += _pair_checks(cfg, after, has_previous=has_previous)
    # Both retrieval situations must hold on their own: an adapter that answers its own facts better but
    # overrides a NEWER contradicting passage would turn fresh documents into stale answers.
    checks.append(_not_below("retrieval_not_harmed", before.retrieval.accuracy, after.retrieval.accuracy,
                             "the fact's own document as the passage"))  # fmt: skip
    checks.append(_not_below("retrieval_update_followed", before.counterfactual.accuracy, after.counterfactual.accuracy,
                             "a passage contradicting the trained value: the answer must follow the passage"))  # fmt: skip
    return checks


def _pair_checks(cfg: FinetuneConfig, after: Figures, *, has_previous: bool) -> list[Check]:
    """Question pairs from any text: their held-out cloze, closed-book, for the new pairs and the kept ones."""
    checks = []
    for name, score, applies in (("new_pairs_recall", after.new_pairs, True),
                                 ("previous_pairs_recall", after.previous_pairs, has_previous)):  # fmt: skip
        if applies and score.total:
            checks.append(_at_least(name, score.accuracy, cfg.min_pair_recall))
        else:
            checks.append(Check(name, True, None, f">= {cfg.min_pair_recall}", "no question pairs to measure"))
    return checks


def build_report(
    cfg: FinetuneConfig,
    before: Figures,
    after: Figures,
    *,
    has_previous: bool,
    extraction: PRF | None,
    training: dict[str, Any],
    facts: int,
) -> GateReport:
    checks = judge(cfg, before, after, has_previous=has_previous)
    checks.append(_extraction_check(cfg, extraction))
    return GateReport(
        passed=all(c.passed for c in checks),
        checks=checks,
        before=before.summary(),
        after=after.summary(),
        extraction=asdict(extraction) if extraction else None,
        training=training,
        facts=facts,
        samples={"before": _samples(before), "after": _samples(after)},
    )


def write_report(report: GateReport, run_dir: Path) -> tuple[Path, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "gate-report.json"
    md_path = run_dir / "gate-report.md"
    json_path.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False, default=str))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def render_markdown(report: GateReport) -> str:
    verdict = "PASSED" if report.passed else "REJECTED"
    lines = [f"# Gate report: {verdict}", "", f"{report.facts} facts; created {time.ctime(report.created_at)}.", "",
             "| check | result | value | threshold | detail |", "|---|---|---|---|---|"]  # fmt: skip
    for c in report.checks:
        lines.append(f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.value} | {c.threshold} | {c.detail} |")
    lines += ["", "| figure | base model | with adapter |", "|---|---|---|"]
    for key in report.before:
        lines.append(f"| {key} | {report.before[key]} | {report.after.get(key)} |")
    if report.extraction:
        e = report.extraction
        lines += ["", f"Extraction against gold facts: precision {e['precision']}, recall {e['recall']}, F1 {e['f1']}."]
    t = report.training
    if t:
        lines += ["", f"Training: {t.get('steps')} steps, {t.get('seconds')} s on {t.get('device')}, stopped by "
                  f"{t.get('stopped')}, best epoch {t.get('best_epoch')}."]  # fmt: skip
        for e in t.get("epochs", []):
            lines.append(f"- epoch {e['epoch']}: ce {e['train_ce']}, kl {e['train_kl']}, val loss {e['val_loss']}, "
                         f"val object acc {e['val_object_acc']}, {e['seconds']} s")  # fmt: skip
    for side in ("before", "after"):
        lines += ["", f"## Sample answers ({'base model' if side == 'before' else 'with adapter'})", ""]
        for bucket, rows in report.samples.get(side, {}).items():
            for row in rows[:4]:
                mark = "ok" if row["ok"] == "True" else "wrong"
                lines.append(
                    f"- [{bucket}, {mark}] {row['question']} -> {row['answer']!r} (expected {row['expected']!r})"
                )
    return "\n".join(lines) + "\n"


def _extraction_check(cfg: FinetuneConfig, extraction: PRF | None) -> Check:
    """Facts extracted from documents that have reviewed gold facts must match them (F1)."""
    if extraction is None:
        return Check("extraction_f1", True, None, f">= {cfg.min_extraction_f1}", "no gold facts for these documents")
    return _at_least("extraction_f1", extraction.f1, cfg.min_extraction_f1)


def _not_below(name: str, base: float | None, adapted: float | None, detail: str) -> Check:
    ok = adapted is None or base is None or adapted >= base
    return Check(name, ok, adapted, f">= base {base}", detail)


def _at_least(name: str, value: float | None, threshold: float) -> Check:
    if value is None:
        return Check(name, False, None, f">= {threshold}", "nothing to measure")
    return Check(name, value >= threshold, value, f">= {threshold}")


def _drop(name: str, before: float | None, after: float | None, limit: float) -> Check:
    if before is None or after is None:
        return Check(name, False, after, f"drop <= {limit}", "nothing to measure")
    drop = round(before - after, 4)
    return Check(name, drop <= limit + 1e-9, after, f"drop <= {limit}", f"base {before}, drop {drop}")


def _rise(name: str, before: float, after: float, limit: float) -> Check:
    rise = after / before - 1.0 if before > 0 else 0.0
    return Check(
        name, rise <= limit + 1e-9, round(after, 4), f"rise <= {limit:.0%}", f"base {before:.4f}, rise {rise:+.2%}"
    )


def _samples(figures: Figures) -> dict[str, Any]:
    return {
        "new_facts": figures.new_facts.samples, "previous_facts": figures.previous_facts.samples,
        "general": figures.general.samples, "retrieval": figures.retrieval.samples,
        "counterfactual": figures.counterfactual.samples, "new_pairs": figures.new_pairs.samples,
        "previous_pairs": figures.previous_pairs.samples,
    }  # fmt: skip
