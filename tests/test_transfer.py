"""Template-free transfer set: answer spans picked in code, questions built around them, a teacher that reads
the document (the real SmolLM2-135M), and `kfresh distill --dry-run --questions` on a folder of ordinary files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kfresh.finetuner.augment import augment, counterfactual_document
from kfresh.finetuner.facts import Fact, read_facts
from kfresh.finetuner.pairs import is_pair, pair_fact
from kfresh.finetuner.questions import cloze_for, question_for
from kfresh.finetuner.spans import pick_spans
from kfresh.finetuner.transfer import candidates, grounded_part

APPOINTED = (
    "The board of Brindlewood Robotics appointed Odalys Fenwick as chief executive officer on 3 March 2026, "
    "the company said."
)
NEWS = {  # ordinary news prose: no sentence is shaped like a finetuner template
    "brindlewood.md": f"# Brindlewood\n\n{APPOINTED} Fenwick previously ran the firm's warehouse division.",
    "harbour.txt": "Dockworkers in Port Selwyn ended a nine-day strike on Friday after the harbour authority "
    "agreed to a 6.5% pay rise. Shipping is expected to return to normal next week.",
    "museum.md": "The Ardent Museum will reopen its east wing in October after a two-year restoration, its "
    "director, Ilse Marrow, told reporters. Admission will stay free for children.",
    "bridge.txt": "Engineers closed the Tallis Bridge to lorries after inspectors found cracks in two of its "
    "piers. The span, opened in 1931, carries 40,000 vehicles a day.",
}


def spans_of(sentence: str) -> list[tuple[str, str]]:
    return [(s.text, s.kind) for s in pick_spans(sentence)]


def test_spans_are_names_dates_numbers_and_quotes_verbatim():
    assert spans_of(APPOINTED) == [
        ("Brindlewood Robotics", "name"),
        ("Odalys Fenwick", "name"),
        ("3 March 2026", "date"),
    ]
    assert spans_of("Inflation rose to 3.2% in September, and the Bank of England kept rates at 4 per cent.") == [
        ("3.2%", "number"), ("September", "date"), ("Bank of England", "name"), ("4 per cent", "number"),
    ]  # fmt: skip
    assert spans_of('Critics called the plan "a blank cheque" on Tuesday, costing $5 million.') == [
        ("a blank cheque", "quote"), ("Tuesday", "date"), ("$5 million", "number"),
    ]  # fmt: skip
    assert spans_of("He said it may rain. They left.") == []  # openers, pronouns and modal 'may' are not spans
    for sentence in (APPOINTED, *NEWS.values()):
        for span in pick_spans(sentence):
            assert sentence[span.start : span.end] == span.text


def test_questions_keep_the_sentence_and_ask_for_the_span():
    spans = {s.text: s for s in pick_spans(APPOINTED)}
    assert question_for(APPOINTED, spans["Odalys Fenwick"]) == (
        "The board of Brindlewood Robotics appointed whom as chief executive officer on 3 March 2026, the company said?"
    )
    assert question_for(APPOINTED, spans["3 March 2026"]).endswith("officer on which date, the company said?")
    pier = "The span, opened in 1931, carries 40,000 vehicles a day."
    by_text = {s.text: s for s in pick_spans(pier)}
    assert question_for(pier, by_text["1931"]) == "The span, opened in which year, carries 40,000 vehicles a day?"
    assert question_for(pier, by_text["40,000"]) == "The span, opened in 1931, carries how many vehicles a day?"
    assert cloze_for(pier, by_text["1931"]).endswith("The span, opened in ___, carries 40,000 vehicles a day.")
    assert question_for("Prices rose 5%.", pick_spans("Prices rose 5%.")[0]) is None  # too short to ask about


@dataclass(frozen=True)
class Doc:
    doc_id: str
    text: str
    version: int = 1
    source: str = "news"
    valid_from: float = 1_780_000_000.0


def test_candidates_spread_over_sentences_and_drop_ambiguous_spans():
    doc = Doc("d", "Mara Quell won the race in Tolby on Sunday. Mara Quell had trained for 14 months in Tolby.")
    found, dropped = candidates(doc, per_doc=3)
    assert {d.span for d in dropped} == {"Mara Quell", "Tolby"}  # twice in the document: which one is meant?
    assert [(c.span, c.question) for c in found] == [  # one per sentence first
        ("Sunday", "Mara Quell won the race in Tolby on which day?"),
        ("14", "Mara Quell had trained for how many months in Tolby?"),
    ]
    assert all(c.span in doc.text and c.span not in c.question for c in found)
    rambling = "Here is what the passage says. The race was won on Sunday by Mara. I hope this helps you today!"
    assert grounded_part(rambling, "Sunday") == "The race was won on Sunday by Mara."


def _pair(span: str, kind: str, question: str, doc_id: str = "brindlewood", version: int = 1) -> Fact:
    sentence = APPOINTED.split(", the company")[0] + "."
    return pair_fact(question=question, answer=sentence, span=span, kind=kind, sentence=sentence, doc_id=doc_id,
                     version=version, date="2026-03-03T00:00:00Z")  # fmt: skip


WHO = "The board of Brindlewood Robotics appointed whom as chief executive officer on 3 March 2026?"
WHEN = "The board of Brindlewood Robotics appointed Odalys Fenwick as chief executive officer on which date?"


def test_pairs_train_on_the_question_and_the_gate_asks_the_cloze():
    who, when = _pair("Odalys Fenwick", "name", WHO), _pair("3 March 2026", "date", WHEN)
    data = augment([who, when])
    # The span first, then the teacher's answer: the adapter learns to answer, not to restate the question.
    assert [(qa.question, qa.answer) for qa in data.train] == [
        (WHO, f"Odalys Fenwick. {who.answer}"),
        (WHEN, f"3 March 2026. {when.answer}"),
    ]
    assert [qa.answer for qa in data.heldout] == ["Odalys Fenwick", "3 March 2026"]
    assert data.heldout[0].question == cloze_for(who.sentence, pick_spans(who.sentence)[1])
    assert not {qa.question for qa in data.heldout} & {qa.question for qa in data.train + data.validation}
    # Context examples: the passage states another value and the target follows it (never the gate's value).
    gate_passage, gate_value = counterfactual_document(who, [who, when])
    first = data.context[0]  # rank 0 of the first pair: a contradicting passage
    assert first.question == WHO and "Odalys Fenwick" not in first.passage
    trained_value = first.passage.split("appointed ")[1].split(" as")[0]
    assert first.answer.startswith(f"{trained_value}. ") and trained_value != gate_value and gate_value in gate_passage
    assert data.context[2].passage == who.sentence and data.context[2].answer == data.train[0].answer  # rank 1
    # A pair is a fact: it survives the facts file; a template fact's record has no pair fields.
    assert Fact.from_dict(who.to_dict()) == who and is_pair(who)
    plain = Fact("the Orvik Tower", "height", "212 metres", "", "t", 1, "The Orvik Tower is 212 metres tall.")
    assert set(plain.to_dict()) == {"subject", "relation", "object", "date", "doc_id", "version", "sentence"}
    assert not is_pair(plain)


def test_logged_questions_become_pairs_when_the_teacher_grounds_them(models_config):
    """Real traffic as a source (issue 17 a): questions from the answer log, answered by the real teacher with the
    document; kept with the document's span its answer holds, when the span's cloze gives it back."""
    from kfresh.finetuner.modeling import load_base
    from kfresh.finetuner.transfer import build_transfer_set, grounding
    from kfresh.models import generator_path

    doc = Doc("museum", NEWS["museum.md"])
    asked = ["Who is the director of the Ardent Museum?", "Which wing of the Ardent Museum will reopen?"]
    sentence, span = grounding(doc, "The Ardent Museum's director is Ilse Marrow.", asked[0]) or ("", None)
    assert span is not None and span.text == "Ilse Marrow" and sentence.startswith("The Ardent Museum will reopen")
    assert grounding(doc, "Paris is the capital of France.") is None
    assert grounding(doc, "It is the Ardent Museum.", asked[0]) is None  # the question's own words add nothing
    lm = load_base(generator_path(models_config), device="cpu")
    transfer = build_transfer_set(lm, [doc], per_doc=2, logged={("museum", 1): asked, ("museum", 2): ["Other?"]})
    figures = transfer.figures()
    assert figures["logged_questions"] == 2  # only the version being distilled, at most per_doc of it
    logged = [p for p in transfer.pairs if p.origin == "logged"]
    dropped = [d for d in transfer.dropped if d.origin == "logged"]
    assert len(logged) + len(dropped) == 2 and figures["pairs_by_origin"].get("logged", 0) == len(logged)
    assert any(p.question == asked[0] and p.span == "Ilse Marrow" for p in logged), (logged, dropped)
    for pair in logged:
        assert pair.question in asked and pair.span in doc.text and pair.span.lower() in pair.answer.lower()
    assert all(d.reason in ("ungrounded", "unstable") for d in dropped)


def test_plan_asks_only_document_versions_whose_pairs_no_adapter_learned(tmp_path, models_config):
    from kfresh.core.config import KfreshConfig
    from kfresh.finetuner.plan import plan_knowledge
    from kfresh.indexer.documents import DocumentIn
    from kfresh.indexer.stores import open_store

    data = KfreshConfig().with_home(tmp_path).model_dump()
    data["models"] = models_config.model_dump()
    data["finetune"].update(stable_for_s=0.0)
    cfg = KfreshConfig.model_validate(data)
    store = open_store(cfg.store)
    for doc_id in ("brindlewood", "harbour", "museum"):
        store.upsert(DocumentIn(doc_id, NEWS[next(n for n in NEWS if n.startswith(doc_id))], source="news/x"), ["x"])
    store.upsert(DocumentIn("museum", "The Ardent Museum closed for good on Monday.", source="news/x"), ["x"])
    store.upsert(DocumentIn("tower", "The Orvik Tower is 212 metres tall.", source="news/x"), ["x"])
    store.close()
    previous = [_pair("Odalys Fenwick", "name", WHO), _pair("3 March 2026", "date", WHEN, doc_id="museum")]
    asked: list[str] = []

    def ask(docs):
        asked.extend(d.doc_id for d in docs)
        return [_pair("Friday", "date", "Dockworkers ended a strike on which day?", doc_id="harbour"),
                _pair("212 metres", "number", "The Orvik Tower is how many metres tall?", doc_id="tower")]  # fmt: skip

    plan = plan_knowledge(cfg, previous=previous, ask=ask)
    assert sorted(asked) == ["harbour", "museum", "tower"]  # brindlewood v1's pairs are learned; museum is now v2
    assert [f.object for f in plan.carried] == ["Odalys Fenwick"]
    # The tower's template fact states 212 metres already: its pair is left out; template facts come first.
    assert [f.object for f in plan.new] == ["212 metres", "Friday"] and not is_pair(plan.new[0])
    assert [f.object for f in plan.removed] == ["3 March 2026"]


def test_gate_judges_question_pairs_on_their_own_threshold():
    from kfresh.core.config import FinetuneConfig
    from kfresh.finetuner.evaluate import Figures, Score
    from kfresh.finetuner.gate import judge

    def figures(pairs: Score) -> Figures:
        return Figures(Score(), Score(), Score(9, 10), Score(1, 1), Score(1, 1), 10.0, new_pairs=pairs)

    cfg = FinetuneConfig(min_pair_recall=0.3)
    low = {c.name: c for c in judge(cfg, figures(Score()), figures(Score(2, 10)), has_previous=False)}
    assert not low["new_pairs_recall"].passed and low["new_pairs_recall"].value == 0.2
    assert low["new_facts_recall"].passed  # no template facts in this run: nothing to hold them to
    high = judge(cfg, figures(Score()), figures(Score(4, 10)), has_previous=False)
    assert all(c.passed for c in high), high


@pytest.mark.slow
def test_dry_run_shows_grounded_pairs_for_every_document_of_a_folder(tmp_path, engine_loop, models_config, capsys):
    """`kfresh ingest DIR` into a real server, then `kfresh distill --dry-run --questions 3`: the teacher (the base
    model with the document in the served prompt) keeps only answers that hold the span, asked two ways."""
    from server_helper import ServerHandle, server_config

    from kfresh.cli import main

    folder = tmp_path / "news"
    folder.mkdir()
    for name, text in NEWS.items():
        (folder / name).write_text(text)
    cfg = server_config(tmp_path / "home", models__cache_dir=models_config.cache_dir)
    handle = ServerHandle(engine_loop, cfg, None)
    try:
        assert main(["ingest", str(folder), "--addr", f"127.0.0.1:{handle.port}", "--wait", "60", "--quiet"]) == 0
        capsys.readouterr()
        argv = ["distill", "--dry-run", "--questions", "3", "--json", "--store.path", str(cfg.store.path),
                "--models.cache_dir", str(models_config.cache_dir), "--finetune.work_dir", str(tmp_path / "work"),
                "--finetune.registry_dir", str(tmp_path / "registry"), "--finetune.stable_for_s", "0"]  # fmt: skip
        assert main(argv) == 0
    finally:
        handle.stop()
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith('{"status"')]
    assert summary, out[-2000:]
    transfer = json.loads(summary[0])["transfer"]
    texts = {p.stem: p.read_text() for p in folder.iterdir()}
    pairs = transfer["pairs"]
    assert transfer["figures"]["documents"] == len(NEWS)
    assert {p["doc_id"].rsplit("/", 1)[-1].split(".")[0] for p in pairs} == set(texts), transfer["dropped"]
    for pair in pairs:
        doc = next(t for stem, t in texts.items() if stem in pair["doc_id"])
        assert pair["span"] in doc and pair["span"].lower() in pair["answer"].lower()
        assert pair["span"] not in pair["question"] and pair["question"].endswith("?")
    assert all(d["reason"] in ("ambiguous_span", "teacher_missed", "unstable") for d in transfer["dropped"])

    # The same command without --dry-run learns the pairs: real training on a tiny budget, gated on the clozes.
    tiny = ["--finetune.max_epochs", "2", "--finetune.time_budget_s", "40", "--finetune.warmup_steps", "1",
            "--finetune.min_pair_recall", "0", "--finetune.min_new_recall", "0", "--finetune.max_general_drop", "0.3",
            "--finetune.max_perplexity_increase", "0.3"]  # fmt: skip
    assert main([a for a in argv if a != "--dry-run"] + tiny) == 0, capsys.readouterr().out[-3000:]
    run = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith('{"status"')))
    assert run["status"] == "published" and run["published"] == "v0001"
    report = json.loads(Path(run["report"]).read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["new_pairs_recall"]["value"] is not None and report["after"]["new_pairs_n"] == len(pairs)
    learned = read_facts(tmp_path / "registry" / "v0001" / "adapter" / "facts.jsonl")
    assert {(f.subject, f.object) for f in learned if is_pair(f)} == {(p["question"], p["span"]) for p in pairs}
