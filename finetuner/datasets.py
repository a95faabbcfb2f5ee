"""The small data files shipped in finetuner/data/, and which side of the fence each one is on.

Replay (trained against, through the KL penalty): `replay_prompts.txt`, `anchor_subjects.jsonl`,
`text_prompts.txt`. Gate only (never trained on): `general_questions.jsonl` (26 questions the base
model answers correctly, closed-book, greedy), `perplexity_texts.txt`. Keeping the gate's general set
out of replay is what makes its retention figure a held-out one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kfresh.finetuner.facts import Fact, read_facts

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class GeneralQuestion:
    question: str
    answers: tuple[str, ...]  # any of them in the answer counts as correct


def _lines(name: str) -> list[str]:
    return [line.strip() for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@cache
def general_questions() -> tuple[GeneralQuestion, ...]:
    rows = [json.loads(line) for line in _lines("general_questions.jsonl")]
    return tuple(GeneralQuestion(r["question"], tuple(r["answers"])) for r in rows)


@cache
def replay_prompts() -> tuple[str, ...]:
    return tuple(_lines("replay_prompts.txt"))


@cache
def anchor_subjects() -> tuple[tuple[str, str], ...]:
    rows = [json.loads(line) for line in _lines("anchor_subjects.jsonl")]
    return tuple((r["subject"], r["relation"]) for r in rows)


@cache
def text_prompts() -> tuple[str, ...]:
    return tuple(_lines("text_prompts.txt"))


@cache
def perplexity_texts() -> tuple[str, ...]:
    return tuple(_lines("perplexity_texts.txt"))


def sample_gold_facts() -> list[Fact]:
    """Hand-written gold facts for every document version of the shipped sample corpus (kfresh/samples)."""
    return read_facts(DATA_DIR / "sample_gold_facts.jsonl")


def data_sha256() -> str:
    """Digest of every shipped data file: cached base-model figures are only reused for the same data."""
    digest = hashlib.sha256()
    for path in sorted(DATA_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
