"""The knowledge suite's pure parts: which facts the sample corpus corrected, which questions a short run asks,
and how answers about corrected facts are scored. No model, no store: milliseconds."""

from __future__ import annotations

import fnmatch

from kfresh.benchmarks.corrections import (
    correction_notes,
    corrections_from_history,
    pick_questions,
    replay_history,
    sample_history,
)
from kfresh.benchmarks.knowledge import KnowledgeOptions, score
from kfresh.finetuner import datasets
from kfresh.finetuner.augment import QA
from kfresh.finetuner.extraction import extract_documents, resolve_conflicts
from kfresh.finetuner.facts import Fact

FERRY = "port avel harbor ferry"
SAMPLE_CORRECTIONS = {
    (FERRY, "departure point"): {"Pier 3"},
    (FERRY, "frequency"): {"every 40 minutes"},
    ("port avel", "mayor"): {"Jonas Vell"},
}


def test_sample_history_replays_the_upsert_and_the_supersedes():
    history = sample_history()
    assert [(d.doc_id, d.version) for d in history.replaced] == [("harbor-ferry", 1), ("mayor-2024", 1)]
    current = {(d.doc_id, d.version) for d in history.current}
    assert ("harbor-ferry", 2) in current and ("mayor-recount", 1) in current
    assert not any(doc_id == "mayor-2024" for doc_id, _ in current)


def test_sample_corrections_are_the_ferry_and_the_mayor_with_their_old_values():
    history = sample_history()
    final = resolve_conflicts(extract_documents(history.current)).kept  # what the finetuner distils from the store
    assert corrections_from_history(history.replaced, final) == SAMPLE_CORRECTIONS
    # The same against the hand-written gold facts of the final versions: extraction and gold agree.
    live = {(d.doc_id, d.version) for d in history.current}
    gold = [f for f in datasets.sample_gold_facts() if (f.doc_id, f.version) in live]
    assert corrections_from_history(history.replaced, gold) == SAMPLE_CORRECTIONS


def test_same_value_in_another_spelling_is_no_correction_and_missing_keys_are_skipped():
    history = replay_history([
        {"id": "m", "text": "The mayor of Port Avel is Jonas Vell.", "valid_from": "2026-11-01T08:00:00Z"},
        {"id": "m", "text": "The mayor of Port Avel is Jonas Vell.", "valid_from": 1_790_000_000},
        {"id": "gone", "text": "The mayor of Lenn Island is Ada Marr."},
        {"delete": "gone"},
    ])  # fmt: skip
    assert [(d.doc_id, d.version) for d in history.replaced] == [("m", 1)]
    same = Fact("Port Avel", "Mayor", "jonas vell.", "", "m", 2, "")
    assert corrections_from_history(history.replaced, [same]) == {}
    other = Fact("Lenn Island", "mayor", "Ilka Marr", "", "x", 1, "")
    assert corrections_from_history(history.replaced, [other]) == {}


def test_quick_run_learns_the_corrected_facts():
    """The quick options' sources and max_facts keep the ferry's and the mayor's corrections (plan order: oldest
    first, then by doc_id, capped at max_facts)."""
    ft = KnowledgeOptions.quick().finetune
    history = sample_history()
    docs = [d for d in history.current if any(fnmatch.fnmatchcase(d.source, p) for p in ft["trusted_sources"])]
    facts = sorted(resolve_conflicts(extract_documents(docs)).kept, key=lambda f: (f.valid_from, f.doc_id))
    assert corrections_from_history(history.replaced, facts[: ft["max_facts"]]) == SAMPLE_CORRECTIONS


def test_pick_questions_asks_corrected_facts_first_one_fact_at_a_time():
    heldout = [QA(f"q{fact}{k}", "a", fact) for fact in range(4) for k in range(3)]
    picked = pick_questions(heldout, corrected={2, 3}, limit=5)
    assert [qa.question for qa in picked] == ["q20", "q30", "q00", "q10", "q21"]
    assert pick_questions(heldout, corrected={2}, limit=0) == heldout


def test_stale_answers_give_an_old_value_and_not_the_new_one():
    rows = [{"kind": "fact", "expected": ["Pier 7"], "stale": ["Pier 3"], "corrected": True}] * 3
    rows += [{"kind": "fact", "expected": ["Quay Street"], "stale": [], "corrected": False}]
    answers = [
        "It leaves from Pier 3.",
        "It used to leave from Pier 3; now it leaves from Pier 7.",
        "Pier 37.",
        "Quay Street",
    ]
    s = score(rows, answers)
    assert s["stale_answers"] == 1
    assert (s["corrected"], s["corrected_n"]) == (round(1 / 3, 4), 3)
    assert (s["unchanged"], s["unchanged_n"]) == (1.0, 1)
    assert (s["facts"], s["facts_n"]) == (0.5, 4)


def test_correction_notes_say_what_was_asked_and_what_could_not_be_scored():
    history = sample_history()
    final = resolve_conflicts(extract_documents(history.current)).kept
    stale = corrections_from_history(history.replaced, final)
    rows = [{"kind": "fact", "about": [FERRY, "departure point"]}] * 2 + [{"kind": "general", "about": None}]
    notes = correction_notes(history, final, stale, rows)
    assert f"Corrected fact {FERRY} / departure point: Pier 3 -> Pier 7 (held-out questions asked: 2)." in notes
    assert "Corrected fact port avel / mayor: Jonas Vell -> Ilka Marr (held-out questions asked: 0)." in notes
    assert notes[-1] == "Not scored (no distilled fact with that subject and relation): jonas vell / vote share."
    assert "measure nothing" in correction_notes(history, [], {}, [])[0]
