"""The reader (finetuner/reader.py): reading-set rows, RAFT-style examples in the served prompt, and a real build:
`kfresh provision --reader-data` trains a LoRA on the real SmolLM2-135M, merges it, and `vllm serve` serves the
merged folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kfresh.finetuner.reader import (
    MANIFEST,
    ReadingSetError,
    encode_example,
    examples,
    load_rows,
    nearest_other,
    nearest_others,
    target,
)
from kfresh.prompt import NOT_FOUND_REPLY, build_messages

CITIES = ["Tolby", "Marrowgate", "Quellin", "Ardent Bay", "Selwyn", "Brindle", "Fenwick Cross", "Odal"]
RUNNERS = ["Mara Quell", "Jonas Vell", "Ilse Marrow", "Odalys Fenwick", "Peter Tallis", "Anika Crumb"]


def reading_set(path: Path, n: int = 48) -> Path:
    """n fictional dated rows, half in the RealTimeQA layout (choices + index), half with a text answer."""
    rows = []
    for i in range(n):
        city, runner = CITIES[i % len(CITIES)], RUNNERS[i % len(RUNNERS)]
        row = {
            "id": f"r{i}",
            "date": f"2025-{1 + i % 12:02d}-{1 + i % 27:02d}",
            "question": f"Who won the marathon in {city} this week?",
            "evidence": f"{runner} won the {city} marathon on Sunday in {2 + i % 3} hours {10 + i} minutes, "
            f"ahead of {RUNNERS[(i + 1) % len(RUNNERS)]}.",
        }
        if i % 2:
            row |= {"choices": [RUNNERS[(i + 1) % len(RUNNERS)], runner], "answer": 1}
        else:
            row["answer"] = runner
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_rows_read_both_layouts_keep_the_past_and_sort_by_date(tmp_path):
    rows = load_rows(reading_set(tmp_path / "set.jsonl"))
    assert len(rows) == 48
    assert [r.valid_from for r in rows] == sorted(r.valid_from for r in rows)
    by_id = {r.id: r for r in rows}
    assert by_id["r1"].answer == RUNNERS[1]  # choices[answer]
    assert by_id["r0"].answer == RUNNERS[0]
    until = load_rows(tmp_path / "set.jsonl", until=by_id["r5"].valid_from)
    assert until and all(r.valid_from <= by_id["r5"].valid_from for r in until) and len(until) < 48


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "set.jsonl:2: not valid JSON"),
        ("[1, 2]", "set.jsonl:2: expected a JSON object"),
        ('{"question": "q", "evidence": "e"}', "set.jsonl:2: field 'date' must be a non-empty string"),
        ('{"question": "q", "evidence": "e", "date": "2025-01-01"}', "set.jsonl:2: field 'answer' must be"),
        (
            '{"question": "q", "evidence": "e", "date": "2025-01-01", "choices": ["a"], "answer": 3}',
            "field 'answer' must index",
        ),
        ('{"question": "q", "evidence": "e", "date": "last Tuesday", "answer": "a"}', "set.jsonl:2: field 'date'"),
    ],
)
def test_a_bad_row_names_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "q", "evidence": "e", "date": "2025-01-01", "answer": "a"}\n' + line + "\n")
    with pytest.raises(ReadingSetError, match=message.replace("[", r"\[")):
        load_rows(path)


def test_documents_become_questions_around_their_spans_with_no_questions_written(tmp_path):
    """A reading set of plain documents (ingest JSONL): each yields questions built around its answer spans,
    the span verbatim in the evidence as the answer; bad document rows name the file, line and field."""
    docs = [
        {"id": "robotics", "valid_from": "2025-03-04", "text": "The board of Brindlewood Robotics appointed "
         "Odalys Fenwick as chief executive officer on 3 March 2025, the company said. She replaces Peter Tallis, "
         "who led the firm for 12 years."},
        {"id": "bridge", "valid_from": 1_741_000_000, "text": "The Tallis Bridge in Marrowgate will close for "
         "repairs in June. About 40,000 vehicles cross it every day."},
        {"question": "Who won the marathon in Tolby?", "evidence": "Mara Quell won the Tolby marathon.",
         "date": "2025-01-02", "answer": "Mara Quell"},
    ]  # fmt: skip
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    rows = load_rows(path)
    made = [r for r in rows if "#" in r.id]
    assert {r.id.split("#")[0] for r in made} == {"robotics", "bridge"}
    assert 2 <= len(made) <= 6 and any(r.answer == "Odalys Fenwick" for r in made)
    for r in made:
        assert r.answer in r.evidence and r.answer not in r.question and r.question.endswith("?")
    assert any(r.question == "Who won the marathon in Tolby?" for r in rows)  # a question row as before
    path.write_text('{"id": "x", "text": "Mara Quell won the race on Sunday."}\n', encoding="utf-8")
    with pytest.raises(ReadingSetError, match="docs.jsonl:1: field 'valid_from' is required"):
        load_rows(path)


def test_a_binary_or_missing_reading_set_is_named(tmp_path):
    (tmp_path / "blob.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ReadingSetError, match="blob.jsonl: not UTF-8 text"):
        load_rows(tmp_path / "blob.jsonl")
    with pytest.raises(ReadingSetError, match="gone.jsonl: cannot read it"):
        load_rows(tmp_path / "gone.jsonl")


def test_examples_are_the_served_prompt_with_the_evidence_and_sometimes_its_distractor(tmp_path, models_config):
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    rows = load_rows(reading_set(tmp_path / "set.jsonl"))
    other = nearest_other(rows, create_embedder(KfreshConfig(models=models_config)).encode)
    assert all(o != i for i, o in enumerate(other))
    # the nearest other passage is about the same city: the distractor a retriever would show
    city = lambda text: next(c for c in CITIES if c in text)  # noqa: E731
    assert sum(city(rows[o].evidence) == city(r.question) for r, o in zip(rows, other)) >= len(rows) * 0.8
    made = examples(rows, other, pair_share=0.5, seed=0)
    assert [a for _, a in made] == [target(r.answer) for r in rows]
    singles = pairs = 0
    for row, o, (messages, _) in zip(rows, other, made):
        if rows[o].evidence in messages[1]["content"]:
            pairs += 1
            assert messages == build_messages(
                row.question, sorted([row.hit(), rows[o].hit(0.5)], key=lambda h: (h.valid_from, h.doc_id))
            )
        else:
            singles += 1
            assert messages == build_messages(row.question, [row.hit()])
    assert singles and pairs  # both kinds at pair_share 0.5
    assert examples(rows, other, pair_share=0.5, seed=0) == made  # seeded


def test_refusal_rows_show_other_passages_only_and_never_one_that_states_the_answer(tmp_path, models_config):
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    rows = load_rows(reading_set(tmp_path / "set.jsonl"))
    others = nearest_others(rows, create_embedder(KfreshConfig(models=models_config)).encode, 2)
    for i, picked in enumerate(others):
        assert len(picked) == 2 and i not in picked
        assert len({rows[j].evidence for j in [*picked, i]}) == 3  # two other passages, not its own twice
    distractor = [o[0] for o in others]
    assert distractor == nearest_other(rows, create_embedder(KfreshConfig(models=models_config)).encode)
    made = examples(rows, distractor, pair_share=0.3, seed=0, refuse_share=0.6, others=others)
    refusals = [(row, picked, m) for row, picked, (m, a) in zip(rows, others, made) if a == NOT_FOUND_REPLY]
    assert refusals  # some rows at refuse_share 0.6
    for row, picked, messages in refusals:
        prompt = messages[1]["content"]
        assert row.evidence not in prompt and all(rows[j].evidence in prompt for j in picked)
        assert row.answer not in prompt  # the reply "not in the documents" is true
    # rows whose distractors name their winner (the runners repeat across cities) are answered, never refused
    stated = [i for i, p in enumerate(others) if any(rows[i].answer in rows[j].evidence for j in p)]
    assert stated and all(made[i][1] == target(rows[i].answer) for i in stated)
    # no refusal share: the examples of before, draw for draw
    assert examples(rows, distractor, pair_share=0.3, seed=0, refuse_share=0.0, others=others) == examples(
        rows, distractor, pair_share=0.3, seed=0
    )


def test_a_reading_set_of_one_passage_is_refused_with_a_reason(tmp_path):
    from kfresh.finetuner.reader import check_size

    rows = load_rows(reading_set(tmp_path / "set.jsonl"))
    same = [replace(r, evidence=rows[0].evidence) for r in rows]
    with pytest.raises(ReadingSetError, match="at least 3 different evidence passages up to the cut-off; it has 1"):
        check_size(same)
    check_size(rows)


def test_the_loss_is_on_the_answer_only(generator_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(generator_path)
    enc = encode_example(tok, [{"role": "user", "content": "Who won?"}], "Mara Quell.")
    answer_at = [i for i, label in enumerate(enc.labels) if label != -100]
    assert answer_at == list(range(answer_at[0], len(enc.input_ids)))
    assert tok.decode([enc.input_ids[i] for i in enc.object_positions]) == "Mara Quell."
    assert tok.decode(enc.input_ids[answer_at[0] :]).startswith("Mara Quell.")


@pytest.mark.slow
def test_provision_builds_the_reader_once_and_vllm_serves_it(tmp_path, models_config):
    import httpx
    import torch
    from safetensors.torch import load_file

    from kfresh.core.config import KfreshConfig
    from kfresh.models import generator_path
    from kfresh.provisioning import provision_reader
    from kfresh.testing.servers import vllm_serve

    data = reading_set(tmp_path / "set.jsonl")
    cfg = KfreshConfig.model_validate({
        "models": models_config.model_dump(),
        "finetune": {"work_dir": str(tmp_path / "work"), "warmup_steps": 1},
    })  # fmt: skip
    dest = tmp_path / "reader"
    out = provision_reader(cfg, data, "2025-10-31", dest=dest, budget_s=25)
    manifest = json.loads((dest / MANIFEST).read_text())
    rows = len(load_rows(data, until=None)) - sum(1 for i in range(48) if 1 + i % 12 > 10)
    assert manifest["rows"] == rows and out["reader_rows"] == rows  # rows after the cut-off are not read
    assert manifest["train_examples"] + manifest["validation_examples"] == rows
    assert manifest["train"]["steps"] > 0 and manifest["until"] == "2025-10-31"
    assert {"general_right", "perplexity"} <= set(manifest["checks"]["after"])
    base = load_file(str(Path(generator_path(models_config)) / "model.safetensors"))
    merged = load_file(str(dest / "model.safetensors"))
    assert set(merged) == set(base)  # a plain model folder: the LoRA is merged, not attached
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any("q_proj" in k for k in changed) and not any("embed_tokens" in k for k in changed)

    mtime = (dest / MANIFEST).stat().st_mtime
    again = provision_reader(cfg, data, "2025-10-31", dest=dest, budget_s=25)
    assert again["reader"] == str(dest) and (dest / MANIFEST).stat().st_mtime == mtime  # built once

    with vllm_serve(str(dest)) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
            "messages": build_messages("Who won the marathon in Tolby?", [load_rows(data)[0].hit()]),
        })  # fmt: skip
    reply.raise_for_status()
    assert reply.json()["choices"][0]["message"]["content"].strip()
