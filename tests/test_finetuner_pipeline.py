"""Finetuner end to end with real components: Indexer-built store, read-only selection, peft training of the real
SmolLM2-135M on a tiny budget, the gate, and the registry. No vLLM is started.

The good run uses a deliberately LOW gate (it trains a dozen steps, so it is a plumbing test, not a
recall figure); the harmful run trains contradicting "facts" about the gate's own general questions
with no KL penalty at a high rate, and the same gate must reject it and keep it out of the registry.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from kfresh.core.config import KfreshConfig
from kfresh.finetuner.distill import run_distill
from kfresh.finetuner.facts import Fact, read_facts
from kfresh.finetuner.registry import AdapterRegistry
from kfresh.finetuner.selection import select_documents
from kfresh.finetuner.worker import run_distill_in_subprocess
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.service import Indexer
from kfresh.indexer.stores import open_store
from kfresh.indexer.stores.sqlite import connect_read_only

T0 = 1_780_000_000.0  # valid_from of the first documents (2026-05-28)
TRUSTED = ["council/*", "transit/*", "city/*"]
HARMFUL = [  # contradict answers the base model gets right (the gate's general set)
    ("France", "Lyon"), ("Japan", "Osaka"), ("England", "Manchester"), ("Russia", "Kazan"),
    ("Egypt", "Luxor"), ("China", "Shanghai"),
]  # fmt: skip


def config(home: Path, models_config, **finetune) -> KfreshConfig:
    data = KfreshConfig().with_home(home).model_dump()
    data["models"] = models_config.model_dump()
    data["finetune"].update(
        trusted_sources=TRUSTED, stable_for_s=0.0, device="cpu", seed=0,
        questions_per_doc=0,  # the template path; question pairs in the pipeline: tests/test_transfer.py
        # A deliberately LOW gate: a dozen steps cannot be held to the production recall threshold.
        min_new_recall=0.0, min_previous_recall=0.0, max_general_drop=0.2, max_perplexity_increase=0.25,
        **finetune,
    )  # fmt: skip
    return KfreshConfig.model_validate(data)


@pytest.fixture(scope="module")
def store_home(tmp_path_factory, embedder_path, models_config) -> tuple[Path, float]:
    """A store written by the real Indexer; returns (home, a time between the stable and the late docs)."""
    from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder

    home = tmp_path_factory.mktemp("distill-home")
    docs = [
        DocumentIn("quillon-mayor", "The mayor of Quillon is Dessa Varn.", source="council/2025.html", valid_from=T0),
        DocumentIn("quillon-mayor-2", "Election news. The mayor of Quillon is Oren Pask.", source="council/2026.html",
                   valid_from=T0 + 100),
        DocumentIn("tower-draft", "The Orvik Tower is 190 metres tall.", source="city/draft.html", valid_from=T0),
        DocumentIn("orvik-tower", "The Orvik Tower is 212 metres tall.", source="city/tower.html", valid_from=T0 + 50,
                   supersedes=("tower-draft",)),
        DocumentIn("night-train", "The night train to Halbrook departs from Platform 9.", source="transit/rail.html",
                   valid_from=T0),
        DocumentIn("rumour", "The harbour master of Quillon is Bram Tell.", source="forum/rumours", valid_from=T0),
        DocumentIn("gone", "The Brask Lighthouse is 30 metres tall.", source="city/old.html", valid_from=T0),
    ]  # fmt: skip
    cfg = config(home, models_config)
    with Indexer(cfg, embedder=SentenceTransformerEmbedder(embedder_path, device="cpu")) as ix:
        for doc in docs:
            ack = ix.upsert(doc)
            assert ix.wait_until_indexed(ack.id, ack.version, 60)
        ix.delete("gone")
        time.sleep(0.05)
        middle = time.time()
        time.sleep(0.05)
        late = ix.upsert(DocumentIn("viaduct", "The Kessa Viaduct spans 410 metres.", source="city/v.html"))
        assert ix.wait_until_indexed(late.id, late.version, 60)
    return home, middle


def test_selection_reads_only_trusted_stable_current_documents(store_home, models_config):
    home, middle = store_home
    cfg = config(home, models_config)
    everything = select_documents(cfg.finetune, cfg.store)
    assert {d.doc_id for d in everything.docs} == {
        "quillon-mayor",
        "quillon-mayor-2",
        "orvik-tower",
        "night-train",
        "viaduct",
    }
    assert everything.skipped["rumour"].startswith("untrusted source")
    assert everything.skipped["tower-draft"] == "superseded by orvik-tower"
    assert "gone" in everything.deleted and "gone" not in everything.skipped

    window = time.time() - middle  # only documents acknowledged before `middle` are stable enough
    stable = select_documents(cfg.finetune.model_copy(update={"stable_for_s": window}), cfg.store)
    assert "viaduct" not in {d.doc_id for d in stable.docs} and "stable_for_s" in stable.skipped["viaduct"]
    assert "night-train" in {d.doc_id for d in stable.docs}

    cited = select_documents(cfg.finetune.model_copy(update={"require_cited": True}), cfg.store)
    assert cited.docs == [] and set(cited.skipped.values()) >= {"never cited by an answer"}

    conn = connect_read_only(cfg.store.path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM documents")
    conn.close()


def test_cited_documents_only_when_required(tmp_path, models_config):
    cfg = config(tmp_path, models_config, require_cited=True)
    store = open_store(cfg.store)
    store.upsert(DocumentIn("a", "The mayor of Quillon is Oren Pask.", source="council/a"), ["x"], now=T0)
    store.upsert(DocumentIn("b", "The Orvik Tower is 212 metres tall.", source="city/b"), ["x"], now=T0)
    store.record_citations([("a", 1)])
    store.close()
    assert [d.doc_id for d in select_documents(cfg.finetune, cfg.store).docs] == ["a"]


@pytest.mark.slow
def test_dry_run_in_a_subprocess_shows_what_would_be_learned(store_home, models_config, tmp_path):
    home, _ = store_home
    cfg = config(home, models_config)
    cfg.finetune.work_dir = tmp_path / "work"
    cfg.finetune.registry_dir = tmp_path / "registry"
    result = run_distill_in_subprocess(cfg, dry_run=True)
    learned = {f.triple for f in result.facts}
    assert learned == {
        ("quillon", "mayor", "oren pask"), ("orvik tower", "height", "212 metres"),
        ("night train", "destination", "halbrook"), ("night train", "departure point", "platform 9"),
        ("kessa viaduct", "length", "410 metres"),
    }  # fmt: skip
    assert [e.fact.object for e in result.excluded] == ["Dessa Varn"]  # an older, conflicting fact
    assert result.status == "dry_run" and result.manifest is None and len(result.data.heldout) == 3 * len(learned)
    assert (result.run_dir / "extraction.jsonl").is_file() and not AdapterRegistry(tmp_path / "registry").list()


@pytest.mark.slow
def test_good_adapter_is_published_and_harmful_one_rejected(store_home, models_config, tmp_path, generator_path):
    home, _ = store_home
    work, registry_dir = tmp_path / "work", tmp_path / "registry"
    good_cfg = config(home, models_config, max_epochs=3, learning_rate=1e-3, warmup_steps=2, time_budget_s=120)
    good_cfg.finetune.work_dir, good_cfg.finetune.registry_dir = work, registry_dir
    good = run_distill(good_cfg)
    report = good.report_path
    assert report is not None and report.is_file() and report.with_suffix(".md").is_file()
    assert good.passed and good.status == "published", report.with_suffix(".md").read_text()
    registry = AdapterRegistry(registry_dir)
    assert registry.current() == good.manifest and good.manifest.version == "v0001"
    adapter = registry.verified_dir("v0001")  # the manifest's sha256 matches the copied weights
    assert {"adapter_config.json", "adapter_model.safetensors", "facts.jsonl", "gate-report.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert len(read_facts(adapter / "facts.jsonl")) == 5 and good.manifest.facts == 5
    assert good.figures["train_seconds"] <= 120 + 30
    assert good.figures["general_accuracy_before"] == 1.0

    harmful_facts = [
        Fact(country, "capital", city, "2026-06-01T00:00:00Z", f"bad-{country}", 1, f"The capital of {country} is {city}.")
        for country, city in HARMFUL
    ]  # fmt: skip
    bad_cfg = config(home, models_config, max_epochs=2, learning_rate=5e-3, warmup_steps=0, kl_weight=0.0,
                     batch_size=8, time_budget_s=150)  # fmt: skip
    bad_cfg.finetune.work_dir, bad_cfg.finetune.registry_dir = work, registry_dir
    bad = run_distill(bad_cfg, facts_override=harmful_facts)
    assert bad.status == "rejected" and not bad.passed and bad.manifest is None
    assert len(bad.carried_facts) == 5  # the published adapter's facts are kept and measured (retention)
    failed = {c["name"] for c in _checks(bad.report_path) if not c["passed"]}
    assert failed & {"general_accuracy", "perplexity"}, failed
    assert [m.version for m in registry.list()] == ["v0001"] and registry.current().version == "v0001"
    assert (bad.run_dir / "gate-report.md").is_file() and (
        bad.run_dir / "adapter" / "adapter_model.safetensors"
    ).is_file()


def _checks(path: Path | None) -> list[dict]:
    import json

    assert path is not None
    return json.loads(path.read_text())["checks"]


def test_plan_keeps_what_the_previous_adapter_knew_unless_its_document_changed(tmp_path, models_config):
    from kfresh.finetuner.plan import plan_knowledge

    cfg = config(tmp_path, models_config)
    store = open_store(cfg.store)
    for doc_id, text in (("tower", "The Orvik Tower is 212 metres tall."), ("train", "The night train departs from Platform 9."),
                         ("gone", "The Brask Lighthouse is 30 metres tall.")):  # fmt: skip
        store.upsert(DocumentIn(doc_id, text, source="city/x", valid_from=T0), ["x"], now=T0)
    store.upsert(
        DocumentIn("train", "The night train departs from Platform 4.", source="city/x", valid_from=T0 + 9), ["x"]
    )
    store.delete("gone")
    store.close()
    date = "2026-05-28T20:26:40Z"
    previous = [
        Fact("the Orvik Tower", "height", "212 metres", date, "tower", 1, "The Orvik Tower is 212 metres tall."),
        Fact("the night train", "departure point", "Platform 9", date, "train", 1, "The night train departs from Platform 9."),
        Fact("the Brask Lighthouse", "height", "30 metres", date, "gone", 1, "The Brask Lighthouse is 30 metres tall."),
        Fact("Quillon", "mayor", "Oren Pask", date, "not-in-this-store", 1, "The mayor of Quillon is Oren Pask."),
    ]  # fmt: skip
    plan = plan_knowledge(cfg, previous=previous, record_dir=tmp_path / "run")
    assert {f.object for f in plan.carried} == {"212 metres", "Oren Pask"}
    assert {f.object for f in plan.new} == {"Platform 4"}
    assert {f.object for f in plan.removed} == {"Platform 9", "30 metres"}
    assert (tmp_path / "run" / "extraction.jsonl").is_file() and len(read_facts(tmp_path / "run" / "facts.jsonl")) == 3
    capped = plan_knowledge(
        cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_facts": 2})}), previous=previous
    )
    assert len(capped.facts) == 2 and [f.object for f in capped.deferred] == ["Platform 4"]  # the newest waits
