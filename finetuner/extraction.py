"""Deterministic template extraction of facts from documents, conflict resolution, and its P/R/F1.

Why templates: the served model (SmolLM2-135M) is too small to extract reliably, even with vLLM's
structured output, and a wrong fact trained into the weights is worse than a missed one. The templates
cover copular and common verb phrasings ("The <relation> of <subject> is <object>", "<subject>'s
<relation> is <object>", "<subject> departs from <object>", "... is <N> metres tall", ...), resolve
"It/Its" to the document's last subject, and turn subject modifiers ("... in Port Avel", "... to Lenn
Island") into facts of their own. Sentences no template matches are recorded for review, not guessed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kfresh.core.time import format_iso
from kfresh.finetuner.facts import Fact

log = logging.getLogger("kfresh.finetuner")

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\d])")
_ADVERBS = re.compile(r"\b(?:now|currently|still)\s+", re.IGNORECASE)
_PRONOUNS = {"it", "its", "they", "this"}
_NAME = r"[A-Z][\w'-]*(?:\s+(?:[A-Z\d][\w'-]*|of|de|van|von))*"
_NUMWORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty|sixty|"
    "seventy|eighty|ninety|a hundred|hundred|a thousand|thousand|dozens|hundreds|thousands"
)
_QUANTITY = rf"(?:(?:around|about|some|over|nearly|roughly|more than) )?(?:\d[\d,.]*|{_NUMWORDS})"
_UNIT_LEN = r"(?:metres|meters|kilometres|kilometers|km|miles|feet|m)"
_MONEY = r"(?:\d[\d.,]* (?:euros?|dollars?|pounds?|francs?|crowns?)|[€$£]\s?\d[\d.,]*)"
_REL = r"[a-z][a-z-]*(?: [a-z-]+){0,3}"
Triple = tuple[str, str, str]


class DocLike(Protocol):
    @property
    def doc_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def valid_from(self) -> float: ...
    @property
    def text(self) -> str: ...


@dataclass
class _Context:
    """The document's current topic, for "It"/"Its" and subject-less clauses."""

    topic: str | None = None
    open_subject: str | None = None  # set by "X is open from ...": a following "from A to B on Ds" continues it


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def extract_document(doc: DocLike) -> tuple[list[Fact], list[str]]:
    """Facts of one document version, and the sentences no template matched (for review)."""
    ctx = _Context()
    facts: list[Fact] = []
    unmatched: list[str] = []
    date = format_iso(doc.valid_from)
    for sentence in split_sentences(doc.text):
        triples = _sentence_triples(sentence, ctx)
        if not triples:
            unmatched.append(sentence)
        seen: set[Triple] = set()
        for s, r, o in triples:
            if (s, r, o) not in seen:
                seen.add((s, r, o))
                facts.append(Fact(s, r, o, date, doc.doc_id, doc.version, sentence))
    return facts, unmatched


def extract_documents(docs: Iterable[DocLike]) -> list[Fact]:
    out: list[Fact] = []
    for doc in docs:
        out += extract_document(doc)[0]
    return out


# -- sentence and clause patterns ------------------------------------------------------------------
def _sentence_triples(sentence: str, ctx: _Context) -> list[Triple]:
    body = _ADVERBS.sub("", sentence.rstrip(".!? ").strip())
    out = _opening_hours(body, ctx)
    if out:
        return out
    for clause in _clauses(body):
        out += _clause_triples(clause, ctx)
    if not out:
        _remember_topic(body, ctx)
    return out


def _remember_topic(body: str, ctx: _Context) -> None:
    """A sentence no template matched may still name what the next ones ("It ...", "Its ...") are about."""
    m = re.match(rf"^((?:The )?{_NAME}) [a-z]", body)
    if m and len(body.split()) >= 4 and m.group(1).split(" ", 1)[0].lower() not in _PRONOUNS:
        _subject(m.group(1), ctx)


def _clauses(body: str) -> list[str]:
    """Split 'A, and it B' / 'A and was B' into clauses; a subject-less clause inherits the topic as 'It'."""
    parts = re.split(r",? and (?=(?:it|its|they|was|is|has|had|opened|became|[a-z]+s)\b)", body)
    return [parts[0]] + [p if p.split(" ", 1)[0].lower() in _PRONOUNS else f"It {p}" for p in parts[1:]]


def _clause_triples(clause: str, ctx: _Context) -> list[Triple]:
    for pattern in (_relation_of, _possessive, _its, _height, _length, _departs, _every, _opened, _closed,
                    _held, _located, _costs, _count):  # fmt: skip
        out = pattern(clause, ctx)
        if out:
            return out
    return []


def _relation_of(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^(?:The )?({_REL}) of (.+?) (?:is|was|are|were) (.+)$", clause)
    if not m:
        return []
    relation, subject, rest = m.groups()
    obj, tail = _object_and_tail(rest)
    subject = _surface(subject)
    ctx.topic = subject
    return [(subject, relation, obj), *_relative_clause(obj, tail)]


def _possessive(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^(.+?)'s ({_REL}) (?:is|was) (.+)$", clause)
    if not m or m.group(1).lower() in _PRONOUNS:
        return []
    subject, out = _subject(m.group(1), ctx)
    obj, tail = _object_and_tail(m.group(3))
    return [*out, (subject, m.group(2), obj), *_relative_clause(obj, tail)]


def _its(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^Its ({_REL}) (?:is|was) (.+)$", clause, re.IGNORECASE)
    if not m or ctx.topic is None:
        return []
    obj, tail = _object_and_tail(m.group(2))
    return [(ctx.topic, m.group(1).lower(), obj), *_relative_clause(obj, tail)]


def _height(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^(.+?) (?:is|stands) (\d[\d,.]* {_UNIT_LEN}) (?:tall|high)$", clause)
    return _with_subject(m, ctx, lambda s: [(s, "height", m.group(2))]) if m else []


def _length(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(
        rf"^(.+?) (?:spans|is|runs|stretches) (\d[\d,.]* {_UNIT_LEN})(?: long)?(?: (?:across|over) (.+))?$", clause
    )
    if not m:
        return []
    return _with_subject(
        m, ctx, lambda s: [(s, "length", m.group(2))] + ([(s, "crossing", m.group(3))] if m.group(3) else [])
    )


def _departs(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) (?:departs|leaves|sails|runs) from (.+)$", clause)
    if not m:
        return []
    rest = m.group(2)
    place = re.match(r"^(.+?)(?= every |, | to |$)", rest)
    every = re.search(r"\bevery ([\w ]+?)(?=,|$| from )", rest)
    hours = re.search(r"\bfrom (\d{1,2}[:.]\d{2} (?:until|to|till) \d{1,2}[:.]\d{2})", rest)
    dest = re.search(rf" to ({_NAME})", rest)

    def build(s: str) -> list[Triple]:
        out = [(s, "departure point", place.group(1))] if place else []
        out += [(s, "frequency", f"every {every.group(1)}")] if every else []
        out += [(s, "service hours", hours.group(1))] if hours else []
        return out + ([(s, "destination", dest.group(1))] if dest else [])

    return _with_subject(m, ctx, build)


def _every(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) (?:runs|rings|departs|leaves|sails|operates|meets) (every [\w ]+)$", clause)
    return _with_subject(m, ctx, lambda s: [(s, "frequency", m.group(2))]) if m else []


def _opened(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) (?:was )?opened(?: to (?:traffic|the public|visitors))? in (.+)$", clause)
    return _with_subject(m, ctx, lambda s: [(s, "opening date", m.group(2))]) if m else []


def _opening_hours(body: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) is open (from .+)$", body)
    if not m:
        return []
    spans = re.findall(r"from (\d{1,2}[:.]\d{2}) (?:to|until|till) (\d{1,2}[:.]\d{2}) on (\w+?)s?\b", m.group(2))
    if not spans:
        return []
    return _with_subject(m, ctx, lambda s: [(s, f"{day} opening hours", f"{a} to {b}") for a, b, day in spans])


def _closed(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) is closed on (\w+)$", clause)
    return _with_subject(m, ctx, lambda s: [(s, "closing day", m.group(2))]) if m else []


def _held(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) (?:is held|takes place) (every [\w ]+?|on \w+)(?: (?:on|in|at) (.+))?$", clause)
    if not m:
        return []
    return _with_subject(
        m, ctx, lambda s: [(s, "schedule", m.group(2))] + ([(s, "location", m.group(3))] if m.group(3) else [])
    )


def _located(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(r"^(.+?) (?:is located|is situated|lies|stands) (?:in|on|at) (.+)$", clause)
    return _with_subject(m, ctx, lambda s: [(s, "location", m.group(2))]) if m else []


def _costs(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^(?:A|An|The) ([\w -]+?) (?:costs|is) ({_MONEY})$", clause)
    if not m or ctx.topic is None:
        return []
    return [(ctx.topic, f"{m.group(1)} price", m.group(2))]


def _count(clause: str, ctx: _Context) -> list[Triple]:
    m = re.match(rf"^({_QUANTITY}) ([a-z]+s) [a-z]+", clause, re.IGNORECASE)
    if not m or ctx.topic is None:
        return []
    return [(ctx.topic, f"number of {m.group(2)}", m.group(1)[:1].lower() + m.group(1)[1:])]


# -- subjects and objects --------------------------------------------------------------------------
def _with_subject(m: re.Match[str], ctx: _Context, build: Callable[[str], list[Triple]]) -> list[Triple]:
    subject, modifiers = _subject(m.group(1), ctx)
    if not subject:
        return []
    return modifiers + build(subject)


def _subject(raw: str, ctx: _Context) -> tuple[str, list[Triple]]:
    """Resolve a pronoun to the topic, else split 'X in Place' / 'X to Place' into X and modifier facts."""
    raw = raw.strip()
    if raw.lower() in _PRONOUNS:
        return ctx.topic or "", []
    modifiers: list[Triple] = []
    core = raw
    m = re.match(rf"^(.+?) to ({_NAME})$", core)
    if m and m.group(1).split(" ", 1)[0] != "A":
        core, modifiers = m.group(1), [("", "destination", m.group(2))]
    m = re.match(rf"^(.+?) (?:in|on) ({_NAME})$", core)
    if m:
        core, modifiers = m.group(1), [("", "location", m.group(2)), *modifiers]
    subject = _surface(core)
    ctx.topic = subject
    return subject, [(subject, r, o) for _, r, o in modifiers]


def _surface(subject: str) -> str:
    """'The Lumen Bridge' -> 'the Lumen Bridge': reads well mid-sentence in the augmented templates."""
    subject = subject.strip()
    return "the" + subject[3:] if subject.startswith("The ") else subject


def _object_and_tail(rest: str) -> tuple[str, str]:
    obj, _, tail = rest.partition(", ")
    return obj.strip(), tail.strip()


def _relative_clause(person: str, tail: str) -> list[Triple]:
    m = re.search(r"^who won .*?with (\d+(?:\.\d+)? (?:percent|per cent|%)) of the vote", tail)
    return [(person, "vote share", m.group(1))] if m else []


# -- conflicts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Excluded:
    fact: Fact
    reason: str
    winner: Fact | None = None


@dataclass
class Resolution:
    kept: list[Fact] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)


def resolve_conflicts(facts: Sequence[Fact]) -> Resolution:
    """Same subject and relation: the newest valid_from wins, older values are excluded (and duplicates)."""
    groups: dict[tuple[str, str], list[Fact]] = {}
    for fact in facts:
        groups.setdefault(fact.key, []).append(fact)
    out = Resolution()
    for group in groups.values():
        ordered = sorted(group, key=lambda f: (f.valid_from, f.version, f.doc_id), reverse=True)
        winner = ordered[0]
        out.kept.append(winner)
        for loser in ordered[1:]:
            same = loser.triple[2] == winner.triple[2]
            reason = "duplicate" if same else f"conflicts with newer {winner.doc_id} v{winner.version}"
            out.excluded.append(Excluded(loser, reason, winner))
    order = {id(f): i for i, f in enumerate(facts)}
    out.kept.sort(key=lambda f: order[id(f)])
    return out


# -- review record and quality -----------------------------------------------------------------------
def write_record(path: Path, docs: Sequence[DocLike], resolution: Resolution) -> None:
    """One JSONL line per document (facts, unmatched sentences) and per excluded fact, for human review."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            facts, unmatched = extract_document(doc)
            row = {"kind": "document", "doc_id": doc.doc_id, "version": doc.version,
                   "facts": [f.to_dict() for f in facts], "unmatched_sentences": unmatched}  # fmt: skip
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        for ex in resolution.excluded:
            row = {"kind": "excluded", "reason": ex.reason, "fact": ex.fact.to_dict(),
                   "winner": ex.winner.to_dict() if ex.winner else None}  # fmt: skip
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int


def extraction_prf(extracted: Iterable[Fact], gold: Iterable[Fact]) -> PRF:
    """Precision, recall and F1 of normalised (subject, relation, object) triples against gold facts."""
    got = {f.triple for f in extracted}
    want = {f.triple for f in gold}
    tp = len(got & want)
    precision = tp / len(got) if got else 0.0
    recall = tp / len(want) if want else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PRF(round(precision, 4), round(recall, 4), round(f1, 4), tp, len(got - want), len(want - got))
