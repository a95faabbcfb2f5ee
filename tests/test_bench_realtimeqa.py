"""The reading suite's dataset reader and scorer, without a model (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfresh.benchmarks import realtimeqa

CHOICES = ["Franklin D. Roosevelt", "Abraham Lincoln", "John F. Kennedy", "Lincoln Chafee"]


def test_right_choice_alone_is_right() -> None:
    assert realtimeqa.is_right("It was built for Abraham Lincoln's funeral in 1865.", CHOICES, 1)
    assert realtimeqa.is_right("abraham   LINCOLN!", CHOICES, 1)


def test_another_choice_beside_the_right_one_is_wrong() -> None:
    assert not realtimeqa.is_right("Either Abraham Lincoln or John F. Kennedy.", CHOICES, 1)


def test_whole_words_only() -> None:
    assert not realtimeqa.is_right("The Abraham Lincolnshire estate.", CHOICES, 1)
    assert not realtimeqa.is_right("", CHOICES, 1)


def test_a_wrong_choice_inside_the_right_one_does_not_count_against_it() -> None:
    choices = ["Lincoln", "Abraham Lincoln", "Kennedy", "Roosevelt"]
    assert realtimeqa.is_right("Abraham Lincoln.", choices, 1)
    assert not realtimeqa.is_right("Abraham Lincoln.", choices, 0)


def test_accents_and_punctuation_are_ignored() -> None:
    assert realtimeqa.is_right(
        "Le Pen's party, the Rassemblement national", ["Rassemblement National", "X", "Y", "Z"], 0
    )
    assert realtimeqa.is_right("It was São Paulo.", ["Sao Paulo", "Rio", "Lima", "Quito"], 0)


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROW = {"id": "20250110_0", "date": "2025-01-10", "source": "CNN", "question": "Q?", "choices": ["a", "b", "c", "d"],
       "answer": 1, "evidence": "E."}  # fmt: skip


def test_periods_split_by_month_and_sample_is_fixed(tmp_path: Path) -> None:
    rows = [{**ROW, "id": f"q{m}", "date": f"2025-{m:02d}-03"} for m in range(1, 13)]
    qs = realtimeqa.load(_write(tmp_path / "d.jsonl", rows))
    assert [q.month for q in realtimeqa.period(qs, "dev")] == list(range(1, 10))
    assert [q.month for q in realtimeqa.period(qs, "test")] == [10, 11, 12]
    assert realtimeqa.sample(qs, 4) == realtimeqa.sample(qs, 4) and len(realtimeqa.sample(qs, 4)) == 4


@pytest.mark.parametrize(
    ("row", "says"),
    [("{not json", "JSONDecodeError"), ({**ROW, "date": "2025/01/10"}, "field 'date'"), ({**ROW, "answer": 7}, "field 'answer'"),
     ({k: v for k, v in ROW.items() if k != "evidence"}, "evidence")],
)  # fmt: skip
def test_a_bad_row_names_file_line_and_field(tmp_path: Path, row: object, says: str) -> None:
    path = _write(tmp_path / "d.jsonl", [ROW, row])
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: .*{says}"):
        realtimeqa.load(path)


def test_a_missing_file_says_how_to_point_at_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="KFRESH_REALTIMEQA"):
        realtimeqa.load(tmp_path / "nope.jsonl")
