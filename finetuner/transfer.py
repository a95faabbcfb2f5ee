"""A transfer set from any document, without templates: span-picked questions answered by a teacher that reads
the document (context distillation's teacher: the base model with the document in its prompt).

For each sentence, answer spans are picked in code (`spans`) and a question is built around each (`questions`).
The teacher answers the question with the document shown in the served prompt format, and once more as a
cloze of the sentence. A pair is kept only when both answers hold the span verbatim (grounded and stable);
every other candidate is reported with the reason it was dropped. A student adapter trained on the kept pairs
without the document learns what the teacher read.

Questions from real traffic (the answer log: questions whose answers showed the document version) go the same
way, except that their span is not known in advance: the teacher answers with the document, the answer is
grounded when it holds a span of the document that the question does not (the longest that occurs once), and stable when the cloze of that
span's sentence gives it back. Each pair and each drop carries its origin ("generated" or "logged").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kfresh.core.text import split_sentences
from kfresh.core.time import format_iso
from kfresh.finetuner.evaluate import contains_answer
from kfresh.finetuner.extraction import DocLike
from kfresh.finetuner.facts import Fact
from kfresh.finetuner.modeling import LoadedModel, chat_answers
from kfresh.finetuner.pairs import pair_fact
from kfresh.finetuner.questions import cloze_for, question_for
from kfresh.finetuner.spans import Span, pick_spans
from kfresh.indexer.documents import Hit
from kfresh.prompt import build_messages

log = logging.getLogger("kfresh.finetuner")
TEACHER_MAX_TOKENS = 32


class SourceDoc(DocLike, Protocol):
    """A document version as the finetuner reads it, with its source (shown to the teacher as in serving)."""

    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class Candidate:
    doc_id: str
    version: int
    sentence: str
    span: str
    kind: str
    question: str
    cloze: str


@dataclass(frozen=True)
class Pair:
    """A kept question with the teacher's answer (the training target) and the span it must contain."""

    doc_id: str
    version: int
    question: str
    answer: str
    span: str
    kind: str
    sentence: str
    origin: str = "generated"


@dataclass(frozen=True)
class Dropped:
    doc_id: str
    question: str
    span: str
    reason: str  # ambiguous_span | teacher_missed | unstable | ungrounded (a logged question: no span in the answer)
    teacher: str = ""
    origin: str = "generated"


@dataclass
class TransferSet:
    documents: int
    pairs: list[Pair] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    logged_asked: int = 0  # logged questions the teacher was asked

    def figures(self) -> dict[str, Any]:
        with_pairs = len({p.doc_id for p in self.pairs})
        return {
            "documents": self.documents,
            "documents_with_pairs": with_pairs,
            "document_share": round(with_pairs / self.documents, 3) if self.documents else None,
            "pairs": len(self.pairs),
            "pairs_per_document": round(len(self.pairs) / self.documents, 2) if self.documents else None,
            "candidates": len(self.pairs) + len(self.dropped),
            "dropped": dict(Counter(d.reason for d in self.dropped)),
            "pairs_by_kind": dict(Counter(p.kind for p in self.pairs)),
            "pairs_by_origin": dict(Counter(p.origin for p in self.pairs)),
            "logged_questions": self.logged_asked,
        }

    def as_facts(self, docs: Sequence[SourceDoc]) -> list[Fact]:
        """The kept pairs as facts (`finetuner.pairs`), dated by their document version."""
        dates = {(d.doc_id, d.version): format_iso(d.valid_from) for d in docs}
        return [
            pair_fact(question=p.question, answer=p.answer, span=p.span, kind=p.kind, sentence=p.sentence,
                      doc_id=p.doc_id, version=p.version, date=dates.get((p.doc_id, p.version), ""))
            for p in self.pairs
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "figures": self.figures(),
            "pairs": [asdict(p) for p in self.pairs],
            "dropped": [asdict(d) for d in self.dropped],
        }


def candidates(doc: SourceDoc, *, per_doc: int) -> tuple[list[Candidate], list[Dropped]]:
    """Up to `per_doc` candidate questions of one document, taken across its sentences in turn (the first span of
    every sentence before the second of any), and the spans dropped because they occur more than once."""
    per_sentence: list[list[Candidate]] = []
    dropped: list[Dropped] = []
    for sentence in split_sentences(doc.text):
        found: list[Candidate] = []
        for span in pick_spans(sentence):
            question = question_for(sentence, span)
            if question is None:
                continue
            if doc.text.count(span.text) > 1:  # which occurrence would the answer be? not a checkable pair
                dropped.append(Dropped(doc.doc_id, question, span.text, "ambiguous_span"))
                continue
            found.append(_candidate(doc, sentence, span, question))
        per_sentence.append(found)
    chosen: list[Candidate] = []
    for rank in range(max((len(c) for c in per_sentence), default=0)):
        chosen += [c[rank] for c in per_sentence if rank < len(c)]
    return chosen[:per_doc], dropped


def _candidate(doc: SourceDoc, sentence: str, span: Span, question: str) -> Candidate:
    return Candidate(doc.doc_id, doc.version, sentence, span.text, span.kind, question, cloze_for(sentence, span))


def teacher_messages(doc: SourceDoc, question: str) -> list[dict[str, str]]:
    """The served prompt with the document as the one passage: what the model answers from at serving time."""
    hit = Hit(
        doc_id=doc.doc_id, version=doc.version, chunk_id=0, ordinal=0, text=doc.text, score=1.0,
        source=doc.source or doc.doc_id, valid_from=doc.valid_from, metadata={},
    )  # fmt: skip
    return build_messages(question, [hit])


def grounded_part(answer: str, span: str) -> str:
    """The teacher's first sentence that holds the span: the training target, without the rambling around it."""
    return next((s for s in split_sentences(answer) if contains_answer(s, [span])), answer.strip())


def build_transfer_set(
    lm: LoadedModel, docs: Sequence[SourceDoc], *, per_doc: int, logged: Mapping[tuple[str, int], Sequence[str]] = {}
) -> TransferSet:
    """Candidates of every document, answered by the teacher twice (question, cloze); grounded and stable kept.
    `logged`: questions from the answer log per (doc_id, version), up to `per_doc` of each asked too."""
    result = TransferSet(documents=len(docs))
    _add_logged(lm, docs, logged, per_doc, result)
    asked: list[tuple[SourceDoc, Candidate]] = []
    for doc in docs:
        found, dropped = candidates(doc, per_doc=per_doc)
        result.dropped += dropped
        asked += [(doc, c) for c in found]
    if not asked:
        return result
    answers = chat_answers(lm, [teacher_messages(d, c.question) for d, c in asked], max_new_tokens=TEACHER_MAX_TOKENS,
                           desc="teacher: questions")  # fmt: skip
    clozes = chat_answers(lm, [teacher_messages(d, c.cloze) for d, c in asked], max_new_tokens=TEACHER_MAX_TOKENS,
                          desc="teacher: cloze")  # fmt: skip
    for (_, c), answer, cloze in zip(asked, answers, clozes):
        if not contains_answer(answer, [c.span]):
            result.dropped.append(Dropped(c.doc_id, c.question, c.span, "teacher_missed", answer))
        elif not contains_answer(cloze, [c.span]):
            result.dropped.append(Dropped(c.doc_id, c.question, c.span, "unstable", cloze))
        else:
            result.pairs.append(
                Pair(c.doc_id, c.version, c.question, grounded_part(answer, c.span), c.span, c.kind, c.sentence)
            )
    log.info("transfer.built %s", result.figures())
    return result


def grounding(doc: SourceDoc, answer: str, question: str = "") -> tuple[str, Span] | None:
    """The sentence and span of `doc` that `answer` holds and `question` does not (what the answer adds): the
    longest such span that occurs once in the document."""
    found = [(sentence, span) for sentence in split_sentences(doc.text) for span in pick_spans(sentence)
             if doc.text.count(span.text) == 1 and contains_answer(answer, [span.text])
             and not contains_answer(question, [span.text])]  # fmt: skip
    return max(found, key=lambda f: len(f[1].text), default=None)


def _add_logged(
    lm: LoadedModel, docs: Sequence[SourceDoc], logged: Mapping[tuple[str, int], Sequence[str]], per_doc: int,
    result: TransferSet,
) -> None:  # fmt: skip
    asked = [(d, q) for d in docs for q in list(logged.get((d.doc_id, d.version), ()))[:per_doc]]
    result.logged_asked = len(asked)
    if not asked:
        return
    answers = chat_answers(lm, [teacher_messages(d, q) for d, q in asked], max_new_tokens=TEACHER_MAX_TOKENS,
                           desc="teacher: logged questions")  # fmt: skip
    grounded: list[tuple[SourceDoc, str, str, str, Span]] = []
    for (doc, question), answer in zip(asked, answers):
        found = grounding(doc, answer, question)
        if found is None:
            result.dropped.append(Dropped(doc.doc_id, question, "", "ungrounded", answer, origin="logged"))
        else:
            grounded.append((doc, question, answer, *found))
    clozes = chat_answers(lm, [teacher_messages(d, cloze_for(s, span)) for d, _, _, s, span in grounded],
                          max_new_tokens=TEACHER_MAX_TOKENS, desc="teacher: logged cloze") if grounded else []  # fmt: skip
    for (doc, question, answer, sentence, span), cloze in zip(grounded, clozes):
        if contains_answer(cloze, [span.text]):
            result.pairs.append(Pair(doc.doc_id, doc.version, question, grounded_part(answer, span.text), span.text,
                                     span.kind, sentence, origin="logged"))  # fmt: skip
        else:
            result.dropped.append(Dropped(doc.doc_id, question, span.text, "unstable", cloze, origin="logged"))
