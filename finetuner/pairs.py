"""Question pairs from any text, carried through a distillation run as facts.

The transfer set (`finetuner.transfer`) keeps span-picked questions that the teacher (the base model reading the
document) answered with the span. Each kept pair becomes a `Fact`: subject = the question, relation =
"asked:<span kind>", object = the span, `answer` = the teacher's answer (the training target), with the document
version, date and sentence like any fact, so selection, conflicts ("newest wins" between two documents asked the
same question), carrying over to the next adapter and removal on delete all work unchanged.

Training asks the question and learns the span, then the teacher's answer (`target`); the gate asks a phrasing
training never saw, the sentence as a cloze ("Fill in the blank ... ___ ..."), and checks the span.
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


def target(fact: Fact) -> str:
    """The training target: the span first, then the teacher's answer. The teacher mostly restates the question's
    sentence with the span filled in; trained on that alone, the adapter learned to restate any question instead
    of answering it (benchmarks/results/knowledge_news-2026-12-06-restated.md)."""
    return span_first(fact.answer, fact.object)


def answer_with(fact: Fact, value: str) -> str:
    """The target stating `value` instead of the span (a context example whose passage says `value`)."""
    said = fact.answer.replace(fact.object, value) if fact.object in fact.answer else value
    return span_first(said, value)


def span_first(answer: str, span: str) -> str:
    answer = answer.strip()
    if not answer or answer == span:
        return span
    return answer if answer.startswith(span) else f"{span}. {answer}"
