"""The unit of distilled knowledge: one (subject, relation, object) fact with its provenance and date.

A question pair from any text (`finetuner.pairs`) is a fact too: subject = the question, relation =
"asked:<span kind>", object = the answer span, with the teacher's answer as its training target.

A fact remembers the document version and sentence it came from, so every trained statement can be
traced back to an acknowledged document, and its date, so conflicting facts resolve to the newest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kfresh.core.time import parse_iso

FACTS_FILE = "facts.jsonl"  # beside an adapter's weights: what it learned, with each fact's document version
_ARTICLE = re.compile(r"^(the|a|an)\s+", re.IGNORECASE)
_PUNCT = re.compile(r"[^\w\s:%€$]")


@dataclass(frozen=True)
class Fact:
    """`subject` keeps its article in lower case ("the Lumen Bridge"), so it reads well inside a sentence."""

    subject: str
    relation: str
    object: str
    date: str  # ISO-8601 UTC of the document version's valid_from
    doc_id: str
    version: int
    sentence: str
    answer: str = ""  # a question pair's target: the teacher's answer ('' for a template fact)
    kind: str = ""  # a question pair's span kind: name | date | number | quote

    @property
    def key(self) -> tuple[str, str]:
        """What the fact is about: two facts with one key and different objects conflict."""
        return normalize(self.subject), normalize(self.relation)

    @property
    def triple(self) -> tuple[str, str, str]:
        """Normalised (subject, relation, object): what extraction precision and recall compare."""
        return normalize(self.subject), normalize(self.relation), normalize(self.object)

    @property
    def valid_from(self) -> float:
        return parse_date(self.date)

    def to_dict(self) -> dict[str, Any]:
        """Every field; the pair-only fields only when set (a template fact's record is unchanged)."""
        return {k: v for k, v in asdict(self).items() if v != "" or k not in ("answer", "kind")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fact:
        return cls(
            subject=str(data["subject"]),
            relation=str(data["relation"]),
            object=str(data["object"]),
            date=str(data.get("date", "")),
            doc_id=str(data.get("doc_id", "")),
            version=int(data.get("version", 0)),
            sentence=str(data.get("sentence", "")),
            answer=str(data.get("answer", "")),
            kind=str(data.get("kind", "")),
        )


def normalize(text: str) -> str:
    """Lower case, no leading article, no punctuation, single spaces: 'The Lumen Bridge' == 'lumen bridge'."""
    text = _ARTICLE.sub("", text.strip())
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def parse_date(text: str) -> float:
    """Unix seconds of an ISO-8601 date; an empty or bad date sorts first (oldest)."""
    if not text:
        return 0.0
    try:
        return parse_iso(text)
    except ValueError:
        return 0.0


def write_facts(path: Path, facts: Iterable[Fact]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for fact in facts:
            fh.write(json.dumps(fact.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_facts(path: Path) -> list[Fact]:
    """Facts from a JSONL file; a missing file holds none."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Fact.from_dict(json.loads(line)) for line in lines if line.strip()]


def facts_sha256(facts: Iterable[Fact]) -> str:
    """Order-independent digest of a fact set (what the adapter was asked to learn)."""
    rows = sorted(json.dumps(f.to_dict(), ensure_ascii=False, sort_keys=True) for f in facts)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()
