"""What one distillation run will teach: selected documents -> facts -> conflicts resolved -> + what the
previous adapter knew and is still true -> capped at max_facts. Pure except for reading the store.

An adapter replaces its predecessor rather than stacking on it, so it must re-learn the previous
adapter's facts that are still valid (their document version is still current), and must NOT re-learn
facts whose document was deleted, superseded or updated since.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kfresh.core.config import KfreshConfig, StoreConfig
from kfresh.finetuner import datasets
from kfresh.finetuner.extraction import PRF, Excluded, extract_document, extraction_prf, resolve_conflicts, write_record
from kfresh.finetuner.facts import Fact, normalize, write_facts
from kfresh.finetuner.pairs import is_pair
from kfresh.finetuner.selection import SelectedDoc, select_documents
from kfresh.indexer.stores import open_store, store_exists

log = logging.getLogger("kfresh.finetuner")
# Question pairs of documents, as facts (`finetuner.transfer`: a teacher model reads each document).
AskFn = Callable[[Sequence[SelectedDoc]], list[Fact]]
# The candidates a run may learn (`finetuner.review`: only what a person approved).
AdmitFn = Callable[[list[Fact]], list[Fact]]


@dataclass
class Plan:
    facts: list[Fact]  # the training set: new + carried
    new: list[Fact]  # not known to the previous adapter
    carried: list[Fact]  # the previous adapter's facts that are still valid
    removed: list[Fact] = field(default_factory=list)  # the previous adapter's facts that are no longer valid
    excluded: list[Excluded] = field(default_factory=list)
    deferred: list[Fact] = field(default_factory=list)  # over max_facts: learned by a later run
    docs: list[SelectedDoc] = field(default_factory=list)
    skipped_docs: dict[str, str] = field(default_factory=dict)
    extraction: PRF | None = None


def plan_knowledge(
    cfg: KfreshConfig,
    *,
    previous: Sequence[Fact] = (),
    facts_override: Sequence[Fact] | None = None,
    record_dir: Path | None = None,
    now: float | None = None,
    ask: AskFn | None = None,
    admit: AdmitFn | None = None,
) -> Plan:
    """With `ask`, the selected documents' question pairs join their template facts; a document version whose pairs
    the previous adapter learned is not asked again (its pairs are carried like any still-valid fact). With
    `admit`, only the candidates it returns are learned (the previous adapter's facts are kept as they are)."""
    ft = cfg.finetune
    docs: list[SelectedDoc] = []
    skipped: dict[str, str] = {}
    extraction: PRF | None = None
    if facts_override is None:
        selection = select_documents(ft, cfg.store, now=now)
        docs, skipped = selection.docs, selection.skipped
        extracted = []
        for doc in docs:
            extracted += extract_document(doc)[0]
        extraction = _gold_prf(docs)
        if ask is not None:
            learned = {(f.doc_id, f.version) for f in previous if is_pair(f)}
            extracted += _not_covered(ask([d for d in docs if (d.doc_id, d.version) not in learned]), extracted)
        if admit is not None:
            extracted = admit(extracted)
    else:
        extracted = list(facts_override)
    live = _live_versions(cfg.store)
    carried_in = [f for f in previous if _still_valid(f, live)]
    resolution = resolve_conflicts(extracted + carried_in)
    known = {f.triple for f in previous}
    # Template facts first (several phrasings each), then question pairs; oldest first within each: all get learned.
    ordered = sorted(resolution.kept, key=lambda f: (is_pair(f), f.valid_from, f.doc_id))
    kept, deferred = ordered[: ft.max_facts], ordered[ft.max_facts :]
    if deferred:
        log.warning(
            "plan.deferred facts=%d (max_facts=%d): the newest wait for the next run", len(deferred), ft.max_facts
        )
    plan = Plan(
        facts=kept,
        new=[f for f in kept if f.triple not in known],
        carried=[f for f in kept if f.triple in known],
        removed=[f for f in previous if f.triple not in {k.triple for k in kept + deferred}],
        excluded=resolution.excluded,
        deferred=deferred,
        docs=docs,
        skipped_docs=skipped,
        extraction=extraction,
    )
    if record_dir is not None:
        write_record(record_dir / "extraction.jsonl", docs, resolution)
        write_facts(record_dir / "facts.jsonl", plan.facts)
    log.info("plan facts=%d new=%d carried=%d excluded=%d docs=%d", len(plan.facts), len(plan.new),
             len(plan.carried), len(plan.excluded), len(docs))  # fmt: skip
    return plan


def _not_covered(pairs: Sequence[Fact], facts: Sequence[Fact]) -> list[Fact]:
    """Pairs whose answer a template fact of the same document already states are left out (the template fact is
    learned from several phrasings; the pair would only repeat it)."""
    covered = {(f.doc_id, normalize(f.object)) for f in facts}
    return [p for p in pairs if (p.doc_id, normalize(p.object)) not in covered]


def _gold_prf(docs: Sequence[SelectedDoc]) -> PRF | None:
    """P/R/F1 on the selected documents that have gold facts (the shipped sample corpus), else None."""
    gold_all = datasets.sample_gold_facts()
    gold: list[Fact] = []
    extracted: list[Fact] = []
    for doc in docs:
        mine = [g for g in gold_all if g.doc_id == doc.doc_id and g.sentence and g.sentence in doc.text]
        if mine:
            gold += mine
            extracted += extract_document(doc)[0]
    return extraction_prf(extracted, gold) if gold else None


def _live_versions(store_cfg: StoreConfig) -> dict[str, int | None]:
    """doc_id -> current version, or None when deleted or explicitly superseded; {} without a store."""
    if not store_exists(store_cfg):
        return {}
    with open_store(store_cfg, read_only=True) as store:
        rows = store.documents()
    out: dict[str, int | None] = {r.doc_id: (None if r.deleted else r.version) for r in rows}
    for r in rows:
        if not r.deleted:
            for old in r.supersedes:
                if old in out:
                    out[old] = None
    return out


def _still_valid(fact: Fact, live: dict[str, int | None]) -> bool:
    """A previous fact stays if the store does not know its document, or knows the very same version."""
    if fact.doc_id not in live:
        return True
    return live[fact.doc_id] == fact.version
