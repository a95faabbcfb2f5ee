"""Finetuner, pure parts: fact templates, conflicts (newest wins), extraction P/R/F1, augmentation, the gate's logic."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kfresh.core.config import FinetuneConfig
from kfresh.finetuner import datasets
from kfresh.finetuner.augment import augment, context_examples, counterfactual, questions, training_alternatives
from kfresh.finetuner.evaluate import Figures, Score, contains_answer
from kfresh.finetuner.extraction import extract_document, extraction_prf, resolve_conflicts
from kfresh.finetuner.facts import Fact, facts_sha256, normalize, parse_date, read_facts, write_facts
from kfresh.finetuner.gate import build_report, render_markdown
from kfresh.finetuner.relations import FAMILIES, GENERIC, PERSON, SPECIFIC

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "kfresh" / "samples"
UNSEEN = Path(__file__).with_name("data") / "finetuner_unseen.jsonl"
# Measured (see the finetuner report): 1.0 on the sample corpus (its gold and the templates were written
# together, so this guards against regressions only) and 0.90 on tests/data/finetuner_unseen.jsonl
# (written before the templates; 0.71 before two generic fixes).
MIN_SAMPLE_F1 = 0.95
MIN_UNSEEN_F1 = 0.85


@dataclass
class Doc:
    doc_id: str
    version: int
    valid_from: float
    text: str


def triples(text: str) -> set[tuple[str, str, str]]:
    return {f.triple for f in extract_document(Doc("d", 1, 0.0, text))[0]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The mayor of Quillon is Dessa Varn.", {("quillon", "mayor", "dessa varn")}),
        ("Orvik's harbour master was Bram Tell.", {("orvik", "harbour master", "bram tell")}),
        ("The Orvik Tower is 212 metres tall.", {("orvik tower", "height", "212 metres")}),
        ("The Kessa Viaduct spans 410 metres across the Vell gorge.",
         {("kessa viaduct", "length", "410 metres"), ("kessa viaduct", "crossing", "vell gorge")}),
        ("The night train to Halbrook departs from Platform 9 every 2 hours.",
         {("night train", "destination", "halbrook"), ("night train", "departure point", "platform 9"),
          ("night train", "frequency", "every 2 hours")}),
        ("The Tamsin Gallery in Orvik opened in May 2025.",
         {("tamsin gallery", "location", "orvik"), ("tamsin gallery", "opening date", "may 2025")}),
        ("The Quillon flower show is held every Sunday afternoon on the river meadow.",
         {("quillon flower show", "schedule", "every sunday afternoon"),
          ("quillon flower show", "location", "river meadow")}),
        ("The Orvik pool is open from 8:00 to 20:00 on weekdays. It is closed on Tuesdays.",
         {("orvik pool", "weekday opening hours", "8:00 to 20:00"), ("orvik pool", "closing day", "tuesdays")}),
        ("The Brask Lighthouse stands on Gull Point. Its keeper is Ona Brisk, and it opened in 1902.",
         {("brask lighthouse", "location", "gull point"), ("brask lighthouse", "keeper", "ona brisk"),
          ("brask lighthouse", "opening date", "1902")}),
        ("The Quillon tram runs from Dock Gate. A day pass costs 6 euros.",
         {("quillon tram", "departure point", "dock gate"), ("quillon tram", "day pass price", "6 euros")}),
        ("Weather was mild and people were happy.", set()),
    ],
)  # fmt: skip
def test_templates_extract_facts(text, expected):
    assert triples(text) == expected


def test_unmatched_sentences_are_recorded_not_guessed():
    facts, unmatched = extract_document(Doc("d", 3, 0.0, "Ferry timetable. The mayor of Quillon is Dessa Varn."))
    assert unmatched == ["Ferry timetable."]
    assert [(f.doc_id, f.version, f.sentence) for f in facts] == [("d", 3, "The mayor of Quillon is Dessa Varn.")]


def load_sample_corpus() -> list[Doc]:
    versions: dict[str, int] = {}
    docs = []
    for day in (1, 2):
        for line in (SAMPLES / f"port_avel_day{day}.jsonl").read_text().splitlines():
            row = json.loads(line)
            versions[row["id"]] = versions.get(row["id"], 0) + 1
            docs.append(Doc(row["id"], versions[row["id"]], parse_date(row["valid_from"]), row["text"]))
    return docs


def test_sample_corpus_extraction_matches_the_shipped_gold():
    docs = load_sample_corpus()
    extracted = [f for d in docs for f in extract_document(d)[0]]
    gold = datasets.sample_gold_facts()
    assert len(gold) == 26 and {g.doc_id for g in gold} == {d.doc_id for d in docs}
    prf = extraction_prf(extracted, gold)
    assert prf.f1 >= MIN_SAMPLE_F1, prf
    for g in gold:  # every gold fact names a real sentence of its document
        assert any(d.doc_id == g.doc_id and g.sentence in d.text for d in docs), g


def test_unseen_phrasings_extraction_f1():
    extracted: list[Fact] = []
    gold: list[Fact] = []
    for line in UNSEEN.read_text().splitlines():
        row = json.loads(line)
        extracted += extract_document(Doc(row["doc"]["id"], 1, 0.0, row["doc"]["text"]))[0]
        gold += [Fact(s, r, o, "", row["doc"]["id"], 1, "") for s, r, o in row["gold"]]
    prf = extraction_prf(extracted, gold)
    assert prf.f1 >= MIN_UNSEEN_F1, prf


def test_prf_counts():
    a = Fact("The Orvik Tower", "height", "212 metres", "", "d", 1, "")
    b = Fact("Quillon", "mayor", "Dessa Varn", "", "d", 1, "")
    c = Fact("Quillon", "mayor", "Oren Pask", "", "d", 1, "")
    prf = extraction_prf([a, c], [Fact("orvik tower", "Height", "212 metres.", "", "x", 9, ""), b])
    assert (prf.true_positives, prf.false_positives, prf.false_negatives) == (1, 1, 1)
    assert prf.precision == prf.recall == prf.f1 == 0.5
    assert extraction_prf([], [b]).f1 == 0.0


def test_conflicts_newest_valid_from_wins_and_duplicates_go():
    old = Fact("Quillon", "mayor", "Dessa Varn", "2026-01-01T00:00:00Z", "council-2025", 1, "s1")
    new = Fact("Quillon", "mayor", "Oren Pask", "2026-03-01T00:00:00Z", "council-2026", 1, "s2")
    same = Fact("quillon", "Mayor", "Oren Pask", "2026-02-01T00:00:00Z", "news", 4, "s3")
    other = Fact("Orvik", "mayor", "Ida Sten", "2025-01-01T00:00:00Z", "news", 1, "s4")
    res = resolve_conflicts([old, other, new, same])
    assert res.kept == [other, new]
    reasons = {ex.fact.doc_id: (ex.reason, ex.winner) for ex in res.excluded}
    assert reasons["council-2025"] == ("conflicts with newer council-2026 v1", new)
    assert reasons["news"] == ("duplicate", new)


def test_facts_roundtrip_and_digest(tmp_path):
    facts = [Fact("the Lumen Bridge", "length", "640 metres", "2026-11-01T08:00:00Z", "lumen-bridge", 1, "s")]
    write_facts(tmp_path / "f.jsonl", facts)
    assert read_facts(tmp_path / "f.jsonl") == facts and read_facts(tmp_path / "missing.jsonl") == []
    assert facts_sha256(facts) == facts_sha256(list(facts)) != facts_sha256([])
    assert normalize("The  Lumen Bridge!") == "lumen bridge" and facts[0].valid_from == parse_date(
        "2026-11-01T08:00:00+00:00"
    )


ALL_PHRASINGS = {"generic": GENERIC, "person": PERSON, **SPECIFIC, **FAMILIES}


@pytest.mark.parametrize("name", sorted(ALL_PHRASINGS))
def test_heldout_templates_are_disjoint_from_training(name):
    p = ALL_PHRASINGS[name]
    assert p.train and p.validation and len(p.heldout) >= 3 and p.statements
    assert not set(p.heldout) & (set(p.train) | set(p.validation)) and not set(p.validation) & set(p.train)
    assert all("{o}" in s for s in p.statements) and not any("{o}" in q for q in p.train + p.validation + p.heldout)


def test_augment_builds_disjoint_sets_and_answers():
    facts = [
        Fact("Quillon", "mayor", "Dessa Varn", "", "a", 1, "The mayor of Quillon is Dessa Varn."),
        Fact("the Orvik Tower", "height", "212 metres", "", "b", 1, "The Orvik Tower is 212 metres tall."),
        Fact("the Quillon tram", "day pass price", "6 euros", "", "c", 1, "A day pass costs 6 euros."),
    ]
    data = augment(facts)
    assert len(data.train) == 12 and len(data.validation) == 3 and len(data.heldout) == 9
    assert all(facts[qa.fact].object in qa.answer for qa in data.train + data.validation)
    assert {qa.answer for qa in data.heldout} == {f.object for f in facts}
    seen = {normalize(qa.question) for qa in data.train + data.validation}
    assert not any(normalize(qa.question) in seen for qa in data.heldout)
    assert "Who is the mayor of Quillon?" in questions("Quillon", "mayor", "train")
    assert "How much does a day pass for the Quillon tram cost?" in questions(
        "the Quillon tram", "day pass price", "train"
    )


def test_counterfactual_passage_states_a_different_value():
    facts = [
        Fact("Quillon", "mayor", "Dessa Varn", "", "a", 1, "The mayor of Quillon is Dessa Varn."),
        Fact("the Orvik pool", "closing day", "Tuesdays", "", "b", 1, "It is closed on Tuesdays."),
        Fact(
            "the Lumen Bridge", "location", "Port Avel", "", "c", 1, "The Lumen Bridge in Port Avel spans 640 metres."
        ),
        Fact("the Port Avel library", "location", "Quay Street", "", "d", 1, "The Port Avel library on Quay Street."),
    ]
    for fact in facts:
        passage, alt = counterfactual(fact, facts)
        assert alt != fact.object and alt in passage and fact.object not in passage
        assert normalize(alt) not in normalize(fact.subject)
    assert counterfactual(facts[1], facts)[1] == "Fridays"


def test_training_alternatives_differ_from_the_fact_and_from_the_gates_value():
    facts = datasets.sample_gold_facts()
    for fact in facts:
        alts = training_alternatives(fact, facts)
        gate = counterfactual(fact, facts)[1]
        assert len(set(alts)) == 2 and fact.object not in alts and gate not in alts, (fact, alts, gate)
    tuesday = Fact("the Orvik pool", "closing day", "Tuesdays", "", "b", 1, "It is closed on Tuesdays.")
    assert training_alternatives(tuesday, [tuesday]) == ("Wednesdays", "Sundays")


def test_context_examples_answer_from_the_passage_with_training_questions_only():
    facts = datasets.sample_gold_facts()
    data = augment(facts)
    assert data.context == context_examples(facts) and len(data.context) == 3 * len(facts)
    first = data.context[: len(facts)]  # rank 0: a contradicting passage, one per fact
    assert [qa.fact for qa in first] == list(range(len(facts)))
    train_questions = {normalize(qa.question) for qa in data.train}
    for rank, qa in enumerate(data.context):
        fact = facts[qa.fact]
        answer, passage = qa.answer.lower(), qa.passage.lower()
        alts = training_alternatives(fact, facts)
        value = fact.object if rank // len(facts) == 1 else alts[rank // len(facts) // 2]
        assert normalize(qa.question) in train_questions and value.lower() in answer and value.lower() in passage
        assert counterfactual(fact, facts)[1] not in qa.passage.replace(fact.object, "")


def test_answer_matching_respects_word_boundaries():
    assert contains_answer("The ferry leaves from  pier 7.", ["Pier 7"])
    assert not contains_answer("It leaves from Pier 70.", ["Pier 7"])
    assert contains_answer("A spider has eight legs.", ["8", "eight"])


def figures(new: float, general: float, ppl: float, retrieval: int, n: int = 10) -> Figures:
    return Figures(
        new_facts=Score(int(new * n), n), previous_facts=Score(), general=Score(int(general * 26), 26),
        retrieval=Score(retrieval, 5), counterfactual=Score(retrieval, 5), perplexity=ppl,
    )  # fmt: skip


def test_gate_passes_a_good_adapter_and_names_what_a_bad_one_broke():
    cfg = FinetuneConfig()
    base = figures(0.0, 1.0, 16.0, 3)
    good = build_report(
        cfg, base, figures(0.8, 24 / 26, 16.5, 4), has_previous=False, extraction=None, training={}, facts=10
    )
    assert good.passed and all(c.passed for c in good.checks)
    bad = build_report(
        cfg, base, figures(0.9, 0.5, 30.0, 2), has_previous=False, extraction=None, training={}, facts=10
    )
    failed = {c.name for c in bad.checks if not c.passed}
    assert not bad.passed and failed == {
        "general_accuracy",
        "perplexity",
        "retrieval_not_harmed",
        "retrieval_update_followed",
    }
    assert "REJECTED" in render_markdown(bad) and "PASSED" in render_markdown(good)
    unlearned = build_report(
        cfg, base, figures(0.1, 1.0, 16.0, 3), has_previous=False, extraction=None, training={}, facts=10
    )
    assert {c.name for c in unlearned.checks if not c.passed} == {"new_facts_recall"}
    stale = figures(0.9, 1.0, 16.0, 4)
    stale.counterfactual = Score(2, 5)  # answers its own facts better, but ignores a newer contradicting passage
    overriding = build_report(cfg, base, stale, has_previous=False, extraction=None, training={}, facts=10)
    assert {c.name for c in overriding.checks if not c.passed} == {"retrieval_update_followed"}


def test_shipped_data_files_keep_gate_and_replay_apart():
    gate = {normalize(g.question) for g in datasets.general_questions()}
    assert len(gate) == 26
    assert not gate & {normalize(p) for p in datasets.replay_prompts()}
    assert len(datasets.replay_prompts()) == 100 and len(datasets.text_prompts()) == 40
    assert len(datasets.perplexity_texts()) >= 10 and not set(datasets.perplexity_texts()) & set(
        datasets.text_prompts()
    )
    assert len(datasets.anchor_subjects()) >= 20


def test_learning_rate_warms_up_then_decays_to_zero_at_the_horizon():
    from kfresh.finetuner.train import _rate

    cfg = FinetuneConfig(learning_rate=1e-3, warmup_steps=10)
    rates = [_rate(cfg, step, horizon=50) for step in range(60)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:])) and rates[50] == 0.0 == rates[59]


def test_gate_rejects_poor_extraction_only_where_gold_facts_exist():
    from kfresh.finetuner.extraction import PRF

    cfg = FinetuneConfig(min_extraction_f1=0.8)
    base, good = figures(0.0, 1.0, 16.0, 3), figures(0.8, 1.0, 16.0, 4)
    poor = PRF(precision=0.5, recall=0.6, f1=0.545, true_positives=3, false_positives=3, false_negatives=2)
    report = build_report(cfg, base, good, has_previous=False, extraction=poor, training={}, facts=10)
    assert {c.name for c in report.checks if not c.passed} == {"extraction_f1"}
    ungraded = build_report(cfg, base, good, has_previous=False, extraction=None, training={}, facts=10)
    assert ungraded.passed and any(c.name == "extraction_f1" and c.passed for c in ungraded.checks)
