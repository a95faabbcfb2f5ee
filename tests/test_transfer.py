"""Template-free transfer set: answer spans picked in code, questions built around them, a teacher that reads
the document (the real SmolLM2-135M), and `kfresh distill --dry-run --questions` on a folder of ordinary files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

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
    with pytest.raises(SystemExit, match="--dry-run only"):
        main(["distill", "--questions", "3"])
