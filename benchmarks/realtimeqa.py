"""RealTimeQA questions with dated evidence (../shared/datasets/realtimeqa-2025.jsonl): loading, periods, scoring.

The file is read by path (never copied into the package). Each row is a weekly news-quiz question with four
choices, the index of the right one and an evidence passage. Periods keep tuning and reporting apart:
`dev` is January-September (what may be tuned or trained on), `test` is October-December (reported only).
Pure functions: no model, no server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kfresh.benchmarks.common import REPO_ROOT

ENV_PATH = "KFRESH_REALTIMEQA"
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "datasets" / "realtimeqa-2025.jsonl"
Period = Literal["dev", "test", "all"]
_PERIOD_MONTHS = {"dev": range(1, 10), "test": range(10, 13), "all": range(1, 13)}


@dataclass(frozen=True)
class Question:
    id: str
    date: str  # YYYY-MM-DD
    source: str
    question: str
    choices: tuple[str, ...]
    answer: int
    evidence: str

    @property
    def right(self) -> str:
        return self.choices[self.answer]

    @property
    def month(self) -> int:
        return int(self.date[5:7])


def dataset_path(path: str | Path = "") -> Path:
    """The dataset file: `path`, else $KFRESH_REALTIMEQA, else ../shared/datasets/ beside the checkout."""
    chosen = Path(path or os.environ.get(ENV_PATH) or DEFAULT_PATH).expanduser()
    if not chosen.is_file():
        raise FileNotFoundError(
            f"RealTimeQA dataset not found at {chosen}: pass --set dataset=PATH or set ${ENV_PATH} "
            "(the file is ../shared/datasets/realtimeqa-2025.jsonl on the project's machines; it is not shipped)"
        )
    return chosen


def load(path: str | Path = "") -> list[Question]:
    """Every row of the file, validated; a bad row names the file, the line and the field."""
    file = dataset_path(path)
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = Question(id=str(row["id"]), date=str(row["date"]), source=str(row.get("source", "")),
                         question=str(row["question"]), choices=tuple(str(c) for c in row["choices"]),
                         answer=int(row["answer"]), evidence=str(row["evidence"]))  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file}:{n}: bad row ({type(exc).__name__}: {exc})") from exc
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", q.date):
            raise ValueError(f"{file}:{n}: field 'date' must be YYYY-MM-DD, got {q.date!r}")
        if not 0 <= q.answer < len(q.choices):
            raise ValueError(f"{file}:{n}: field 'answer' {q.answer} is not an index into {len(q.choices)} choices")
        out.append(q)
    return out


def period(questions: Sequence[Question], name: Period) -> list[Question]:
    months = _PERIOD_MONTHS[name]
    return [q for q in questions if q.month in months]


def sample(questions: Sequence[Question], n: int) -> list[Question]:
    """A fixed, spread-out sample of n (every k-th question in file order): the same for every run."""
    if n <= 0 or n >= len(questions):
        return list(questions)
    step = len(questions) / n
    return [questions[int(i * step)] for i in range(n)]


def normalize(text: str) -> str:
    """Lower case, accents and punctuation removed, one space between words, padded for whole-word matching."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return f" {' '.join(text.split())} "


def is_right(answer: str, choices: Sequence[str], right: int) -> bool:
    """Right when the right choice appears (whole words, case- and punctuation-insensitive) and no other does.

    A wrong choice that is part of the right one ("Lincoln" inside "Abraham Lincoln") is looked for only outside
    the right choice's occurrences; one that contains the right choice counts wherever it appears.
    """
    said = normalize(answer)
    target = normalize(choices[right])
    if target.strip() == "" or target not in said:
        return False
    rest = said.replace(target, " ")
    for i, choice in enumerate(choices):
        other = normalize(choice)
        if i == right or not other.strip():
            continue
        if other in (rest if other in target else said):
            return False
    return True


def write_documents(out: Path, *, until: str, path: str | Path = "") -> int:
    """The evidence passages dated up to `until` (YYYY-MM-DD) as a documents file (`kfresh ingest` JSONL: id,
    text, valid_from), each passage once, without its question: what `kfresh provision --reader-data` builds a
    reader from when no questions may be used. Returns how many were written."""
    seen: set[str] = set()
    lines = []
    for q in load(path):
        if q.date <= until and q.evidence not in seen:
            seen.add(q.evidence)
            lines.append(json.dumps({"id": q.id, "text": q.evidence, "valid_from": q.date, "source": q.source}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Export RealTimeQA evidence passages as documents (no questions): "
        "python -m kfresh.benchmarks.realtimeqa --until 2025-09-30 --out .kfresh/realtimeqa-dev-documents.jsonl"
    )
    parser.add_argument("--until", required=True, help="last date (YYYY-MM-DD) whose passages are written")
    parser.add_argument("--out", type=Path, required=True, help="the documents file to write (outside the package)")
    parser.add_argument("--dataset", default="", help=f"the dataset file (default ${ENV_PATH} or {DEFAULT_PATH})")
    args = parser.parse_args()
    print(f"wrote {write_documents(args.out, until=args.until, path=args.dataset)} documents to {args.out}")


if __name__ == "__main__":
    main()
