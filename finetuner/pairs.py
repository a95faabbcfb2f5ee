"""Question pairs from any text, carried through a distillation run as facts.

The transfer set (`finetuner.transfer`) keeps span-picked questions that the teacher (the base model reading the
document) answered with the span. Each kept pair becomes a `Fact`: subject = the question, relation =
"asked:<span kind>", object = the span, `answer` = the teacher's answer (the training target), with the document
version, date and sentence like any fact, so selection, conflicts ("newest wins" between two documents asked the
same question), carrying over to the next adapter and removal on delete all work unchanged.

Training asks the question and learns the teacher's answer; the gate asks a phrasing training never saw, the
sentence as a cloze ("Fill in the blank ... ___ ..."), and checks the span.
"""

from __future__ import annotations

from kfresh.finetuner.facts import Fact
from kfresh.finetuner.questions import cloze_for
from kfresh.finetuner.spans import Span, SpanKind

PAIR_PREFIX = "asked:"


def is_pair(fact: Fact) -> bool:
    return fact.relation.startswith(PAIR_PREFIX)


def pair_fact(
    *, question: str, answer: str, span: str, kind: str, sentence: str, doc_id: str, version: int, date: str
) -> Fact:
    return Fact(question, PAIR_PREFIX + kind, span, date, doc_id, version, sentence, answer=answer, kind=kind)


def span_of(fact: Fact) -> Span:
    """The pair's answer span where it stands in its sentence (the first occurrence; spans are unique by
    construction)."""
    start = max(fact.sentence.find(fact.object), 0)
    kind: SpanKind = fact.kind if fact.kind in ("date", "number", "name", "quote") else "name"  # type: ignore[assignment]
    return Span(fact.object, kind, start, start + len(fact.object))


def heldout_question(fact: Fact) -> str:
    """The gate's closed-book question: the sentence as a cloze, a phrasing training never asks."""
    return cloze_for(fact.sentence, span_of(fact))


def is_person(fact: Fact) -> bool:
    return span_of(fact).is_person


def answer_with(fact: Fact, value: str) -> str:
    """The teacher's answer stating `value` instead of the span (a context example's target)."""
    return fact.answer.replace(fact.object, value) if fact.object in fact.answer else value
