"""Facts into training data: paraphrased statements and Q/A pairs, plus held-out questions for the gate.

A fact learned from one phrasing is recalled only for that phrasing, so each fact becomes several
questions answered by several statements. The gate asks paraphrases from a DISJOINT template set
(`relations.Phrasing.heldout`) that training never sees, so it measures knowledge, not memorised strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kfresh.finetuner import pairs
from kfresh.finetuner.facts import Fact, normalize
from kfresh.finetuner.relations import PERSON, phrasing_for, render
from kfresh.indexer.documents import Hit

_NUMBER = re.compile(r"\d+")
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_DAY = re.compile(rf"\b({'|'.join(d.capitalize() for d in _DAYS)})", re.IGNORECASE)
_NUMBER_WORDS = [
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
    "hundred",
    "thousand",
]
_NUMBER_WORD = re.compile(rf"\b({'|'.join(_NUMBER_WORDS)})\b", re.IGNORECASE)
_INVENTED_PEOPLE = ("Tomas Reed", "Anya Holm", "Pello Varga")
_INVENTED_PLACES = ("Harrow Lane", "the North Quay", "Velmont Square")
# Values only training's context examples use: never the ones `counterfactual` (the gate) states.
_TRAINING_PEOPLE = ("Lina Okafor", "Bram Steyn", "Odile Ferro")
_TRAINING_PLACES = ("Copper Street", "the East Pier", "Mill Road")


@dataclass(frozen=True)
class QA:
    """One question about fact number `fact` with its reference answer (from `passage` when one is shown)."""

    question: str
    answer: str
    fact: int
    passage: str = ""  # the retrieved text the prompt shows ('' = closed book)


@dataclass(frozen=True)
class AugmentedFacts:
    facts: list[Fact]
    train: list[QA]
    validation: list[QA]
    heldout: list[QA]
    context: list[QA] = field(default_factory=list)  # rank by rank: the first len(facts) are rank 0, ...

    @property
    def statements(self) -> list[str]:
        return [qa.answer for qa in self.train]


def statements(fact: Fact) -> list[str]:
    if pairs.is_pair(fact):
        return [pairs.target(fact)]
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
        if pairs.is_pair(fact):  # the question, answered as the teacher did; the gate asks the cloze
            train.append(QA(fact.subject, pairs.target(fact), i))
            validation.append(QA(fact.subject, pairs.target(fact), i))
            heldout.append(QA(pairs.heldout_question(fact), fact.object, i))
            continue
        said = statements(fact)
        for j, question in enumerate(questions(fact.subject, fact.relation, "train")):
            train.append(QA(question, said[j % len(said)], i))
        validation += [QA(q, said[0], i) for q in questions(fact.subject, fact.relation, "validation")]
        heldout += [QA(q, fact.object, i) for q in questions(fact.subject, fact.relation, "heldout")]
    seen = {normalize(qa.question) for qa in train + validation}
    leaked = [qa.question for qa in heldout if normalize(qa.question) in seen]
    if leaked:  # the gate would measure memorised strings, not knowledge
        raise ValueError(f"held-out questions also appear in training: {leaked[:3]}")
    return AugmentedFacts(list(facts), train, validation, heldout, context_examples(facts))


def context_examples(facts: Sequence[Fact]) -> list[QA]:
    """Retrieval-prompt examples, ordered by rank so that a prefix of len(facts) * k holds k per fact.

    Rank 0: the fact's document changed to a training-only value, answered with that value; rank 1: the
    document as it is, answered with the fact; rank 2: another training-only value. Train questions only.
    """
    ranks: list[list[QA]] = [[], [], []]
    for i, fact in enumerate(facts):
        document = document_text(fact, facts)
        alts = training_alternatives(fact, facts)
        for rank, value in enumerate((alts[0], fact.object, alts[1])):
            passage = document if value == fact.object else _contradicting(fact, document, value)
            if pairs.is_pair(fact):
                ranks[rank].append(QA(fact.subject, pairs.answer_with(fact, value), i, passage))
                continue
            asked = questions(fact.subject, fact.relation, "train")
            said = statements(_with_object(fact, value))
            ranks[rank].append(QA(asked[(i + rank) % len(asked)], said[(i + rank) % len(said)], i, passage))
    return [qa for rank in ranks for qa in rank]


def anchor_questions(pairs: Sequence[tuple[str, str]], *, per_pair: int = 2) -> list[str]:
    """Questions about REAL entities in the same templates as the facts (replay anchors)."""
    out: list[str] = []
    for subject, relation in pairs:
        out += questions(subject, relation, "train")[:per_pair]
    return out


def document_text(fact: Fact, facts: Sequence[Fact]) -> str:
    """The fact's document as far as the facts know it (its sentences in order): what a retrieved chunk shows."""
    sentences: list[str] = []
    for other in facts:
        if (other.doc_id, other.version) == (fact.doc_id, fact.version) and other.sentence not in sentences:
            sentences.append(other.sentence)
    return " ".join(s for s in sentences if s) or statements(fact)[0]


def passage_hit(fact: Fact, text: str) -> Hit:
    """`text` as the retrieved chunk of the fact's document (what `kfresh.prompt.build_messages` takes)."""
    return Hit(
        doc_id=fact.doc_id or "fact", version=fact.version, chunk_id=0, ordinal=0, text=text, score=1.0,
        source=fact.doc_id or "fact", valid_from=fact.valid_from, metadata={},
    )  # fmt: skip


def counterfactual_document(fact: Fact, others: Sequence[Fact]) -> tuple[str, str]:
    """The gate's contradicting passage: the fact's document with `counterfactual`'s value, and that value."""
    _, alt = counterfactual(fact, others)
    return _contradicting(fact, document_text(fact, others), alt), alt


def _contradicting(fact: Fact, document: str, value: str) -> str:
    changed = _restated(fact, value)
    return document.replace(fact.sentence, changed) if fact.sentence and fact.sentence in document else changed


def _restated(fact: Fact, value: str) -> str:
    if fact.object and fact.object in fact.sentence:
        return fact.sentence.replace(fact.object, value)
    return statements(_with_object(fact, value))[0]


def _with_object(fact: Fact, value: str) -> Fact:
    return Fact(fact.subject, fact.relation, value, fact.date, fact.doc_id, fact.version, "")


def _is_person(fact: Fact) -> bool:
    return pairs.is_person(fact) if pairs.is_pair(fact) else phrasing_for(fact.relation)[0] is PERSON


def training_alternatives(fact: Fact, others: Sequence[Fact]) -> tuple[str, str]:
    """Two values for training's context examples, different from the fact's and from the gate's."""
    gate = _other_object(fact, others)
    if _NUMBER.search(fact.object):
        n = int(_NUMBER.search(fact.object).group())  # type: ignore[union-attr]
        shifts = (n - 1, n + 1) if 1000 <= n <= 2100 else (n + 1, n + 3) if n < 10 else (round(n * 0.8), round(n * 1.5))
        alts = [_NUMBER.sub(str(v), fact.object, count=1) for v in shifts]
    elif _NUMBER_WORD.search(fact.object):
        word = _NUMBER_WORD.search(fact.object).group(1)  # type: ignore[union-attr]
        i = _NUMBER_WORDS.index(word.lower())
        alts = [fact.object.replace(word, _NUMBER_WORDS[(i + k) % len(_NUMBER_WORDS)]) for k in (1, 3)]
    elif _DAY.search(fact.object):
        day = _DAY.search(fact.object).group(1)  # type: ignore[union-attr]
        i = _DAYS.index(day.lower())
        alts = [fact.object.replace(day, _DAYS[(i + k) % 7].capitalize()) for k in (1, 5)]
    else:
        person = _is_person(fact)
        taken = normalize(fact.subject) + " " + normalize(fact.object)
        alts = [a for a in (_TRAINING_PEOPLE if person else _TRAINING_PLACES) if normalize(a) not in taken]
    alts = [a for a in alts if a not in (fact.object, gate)]
    if len(alts) < 2:
        raise ValueError(f"no training-only alternative values for {fact.object!r}")
    return alts[0], alts[1]


def counterfactual(fact: Fact, others: Sequence[Fact]) -> tuple[str, str]:
    """A passage that contradicts `fact` and the object it states instead.

    Used by the gate: with a contradicting passage in the prompt, an adapted model must still follow the
    passage (retrieval stays the source of truth once knowledge changes again).
    """
    alt = _other_object(fact, others)
    return _restated(fact, alt), alt


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
    person = _is_person(fact)
    same = [o.object for o in others if normalize(o.relation) == normalize(fact.relation)]
    pool = same + list(_INVENTED_PEOPLE if person else _INVENTED_PLACES)
    taken = normalize(fact.subject) + " " + normalize(fact.object)
    return next(alt for alt in pool if alt != fact.object and normalize(alt) not in taken)


def _shift(n: int) -> int:
    if 1000 <= n <= 2100:  # a year
        return n + 3
    return n + 2 if n < 10 else round(n * 1.25)
