"""Facts into training data: paraphrased statements and Q/A pairs, plus held-out questions for the gate.

A fact learned from one phrasing is recalled only for that phrasing, so each fact becomes several
questions answered by several statements. The gate asks paraphrases from a DISJOINT template set
(`relations.Phrasing.heldout`) that training never sees, so it measures knowledge, not memorised strings.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kfresh.finetuner.facts import Fact, normalize
from kfresh.finetuner.relations import PERSON, phrasing_for, render

_NUMBER = re.compile(r"\d+")
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_DAY = re.compile(rf"\b({'|'.join(d.capitalize() for d in _DAYS)})", re.IGNORECASE)
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twenty", "thirty",
                 "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand"]
_NUMBER_WORD = re.compile(rf"\b({'|'.join(_NUMBER_WORDS)})\b", re.IGNORECASE)
_INVENTED_PEOPLE = ("Tomas Reed", "Anya Holm", "Pello Varga")
_INVENTED_PLACES = ("Harrow Lane", "the North Quay", "Velmont Square")


@dataclass(frozen=True)
class QA:
    """One question about fact number `fact` with its reference answer."""

    question: str
    answer: str
    fact: int


@dataclass(frozen=True)
class AugmentedFacts:
    facts: list[Fact]
    train: list[QA]
    validation: list[QA]
    heldout: list[QA]

    @property
    def statements(self) -> list[str]:
        return [qa.answer for qa in self.train]


def statements(fact: Fact) -> list[str]:
    phrasing, x = phrasing_for(fact.relation)
    return [render(t, subject=fact.subject, relation=fact.relation, obj=fact.object, x=x) for t in phrasing.statements]


def questions(subject: str, relation: str, split: str) -> list[str]:
    """Questions of one split ('train', 'validation' or 'heldout') about (subject, relation)."""
    phrasing, x = phrasing_for(relation)
    return [render(t, subject=subject, relation=relation, x=x) for t in getattr(phrasing, split)]


def augment(facts: Sequence[Fact]) -> AugmentedFacts:
    """Train pairs (each train question answered by a different statement), validation and held-out sets."""
    train: list[QA] = []
    validation: list[QA] = []
    heldout: list[QA] = []
    for i, fact in enumerate(facts):
        said = statements(fact)
        for j, question in enumerate(questions(fact.subject, fact.relation, "train")):
            train.append(QA(question, said[j % len(said)], i))
        validation += [QA(q, said[0], i) for q in questions(fact.subject, fact.relation, "validation")]
        heldout += [QA(q, fact.object, i) for q in questions(fact.subject, fact.relation, "heldout")]
    seen = {normalize(qa.question) for qa in train + validation}
    leaked = [qa.question for qa in heldout if normalize(qa.question) in seen]
    if leaked:  # the gate would measure memorised strings, not knowledge
        raise ValueError(f"held-out questions also appear in training: {leaked[:3]}")
    return AugmentedFacts(list(facts), train, validation, heldout)


def anchor_questions(pairs: Sequence[tuple[str, str]], *, per_pair: int = 2) -> list[str]:
    """Questions about REAL entities in the same templates as the facts (replay anchors)."""
    out: list[str] = []
    for subject, relation in pairs:
        out += questions(subject, relation, "train")[:per_pair]
    return out


def counterfactual(fact: Fact, others: Sequence[Fact]) -> tuple[str, str]:
    """A passage that contradicts `fact` and the object it states instead.

    Used by the gate: with a contradicting passage in the prompt, an adapted model must still follow the
    passage (retrieval stays the source of truth once knowledge changes again).
    """
    alt = _other_object(fact, others)
    if fact.object and fact.object in fact.sentence:
        return fact.sentence.replace(fact.object, alt), alt
    return statements(Fact(fact.subject, fact.relation, alt, fact.date, fact.doc_id, fact.version, ""))[0], alt


def _other_object(fact: Fact, others: Sequence[Fact]) -> str:
    """A plausible different value that the question and subject do not already contain."""
    if _NUMBER.search(fact.object):
        return _NUMBER.sub(lambda m: str(_shift(int(m.group()))), fact.object, count=1)
    word = _NUMBER_WORD.search(fact.object)
    if word:
        i = _NUMBER_WORDS.index(word.group(1).lower())
        return fact.object.replace(word.group(1), _NUMBER_WORDS[(i + 2) % len(_NUMBER_WORDS)])
    day = _DAY.search(fact.object)
    if day:
        i = _DAYS.index(day.group(1).lower())
        return fact.object.replace(day.group(1), _DAYS[(i + 3) % 7].capitalize())
    person = phrasing_for(fact.relation)[0] is PERSON
    same = [o.object for o in others if normalize(o.relation) == normalize(fact.relation)]
    pool = same + list(_INVENTED_PEOPLE if person else _INVENTED_PLACES)
    taken = normalize(fact.subject) + " " + normalize(fact.object)
    return next(alt for alt in pool if alt != fact.object and normalize(alt) not in taken)


def _shift(n: int) -> int:
    if 1000 <= n <= 2100:  # a year
        return n + 3
    return n + 2 if n < 10 else round(n * 1.25)
