"""What the gate measures, for the base model and for a trained adapter, with transformers + peft.

Greedy decoding in float32, all questions of one model in one batched pass. A closed-book answer is right
when it contains the expected object (case-insensitive, on word boundaries). Retrieval answers use the
server's own prompt (passages in the system message, `kfresh.prompt.build_messages`), once with the
fact's source sentence and once with a contradicting passage: an adapter must not stop the model from
following what retrieval shows it, or fresh documents would lose to stale weights.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kfresh.finetuner import datasets
from kfresh.finetuner.augment import QA, AugmentedFacts, counterfactual_document, document_text, passage_hit
from kfresh.finetuner.modeling import LoadedModel, Messages, chat_answers
from kfresh.finetuner.pairs import is_pair
from kfresh.prompt import build_messages, closed_book_messages

MAX_NEW_TOKENS = 32
SAMPLES = 6  # answers kept per set for the report


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return round(self.correct / self.total, 4) if self.total else None


@dataclass
class Figures:
    """One model's results. `general` and `perplexity` do not depend on the facts (cached for the base)."""

    new_facts: Score
    previous_facts: Score
    general: Score
    retrieval: Score  # the fact's own sentence as the passage
    counterfactual: Score  # a contradicting passage: the answer must follow the passage
    perplexity: float
    new_pairs: Score = field(default_factory=Score)  # question pairs from any text: their held-out cloze
    previous_pairs: Score = field(default_factory=Score)

    @property
    def retrieval_all(self) -> float | None:
        total = self.retrieval.total + self.counterfactual.total
        return round((self.retrieval.correct + self.counterfactual.correct) / total, 4) if total else None

    def summary(self) -> dict[str, Any]:
        return {
            "new_recall": self.new_facts.accuracy, "new_n": self.new_facts.total,
            "previous_recall": self.previous_facts.accuracy, "previous_n": self.previous_facts.total,
            "general_accuracy": self.general.accuracy, "general_n": self.general.total,
            "perplexity": round(self.perplexity, 4),
            "retrieval_accuracy": self.retrieval.accuracy, "counterfactual_accuracy": self.counterfactual.accuracy,
            "retrieval_all": self.retrieval_all,
            "new_pairs_recall": self.new_pairs.accuracy, "new_pairs_n": self.new_pairs.total,
            "previous_pairs_recall": self.previous_pairs.accuracy, "previous_pairs_n": self.previous_pairs.total,
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), **{k: v for k, v in asdict(self).items()}}


def contains_answer(answer: str, expected: Sequence[str]) -> bool:
    text = " ".join(answer.lower().split())
    return any(re.search(rf"(?<!\w){re.escape(' '.join(e.lower().split()))}(?!\w)", text) for e in expected)


@dataclass(frozen=True)
class Ask:
    bucket: str
    messages: Messages
    expected: tuple[str, ...]
    question: str


def evaluation_set(new: AugmentedFacts, previous: AugmentedFacts | None, *, general: bool) -> list[Ask]:
    """Every question one model is asked: held-out paraphrases, retrieval and counterfactual prompts, general."""
    asks = [Ask(_bucket("new", new, qa), closed_book_messages(qa.question), (qa.answer,), qa.question)
            for qa in new.heldout]  # fmt: skip
    if previous is not None:
        asks += [
            Ask(_bucket("previous", previous, qa), closed_book_messages(qa.question), (qa.answer,), qa.question)
            for qa in previous.heldout
        ]
    for i, fact in enumerate(new.facts):
        question = _first_heldout(new.heldout, i)
        document = document_text(fact, new.facts)
        asks.append(Ask("retrieval", build_messages(question, [passage_hit(fact, document)]), (fact.object,), question))
        contradicting, alt = counterfactual_document(fact, new.facts)
        asks.append(
            Ask("counterfactual", build_messages(question, [passage_hit(fact, contradicting)]), (alt,), question)
        )
    if general:
        asks += [
            Ask("general", closed_book_messages(g.question), g.answers, g.question)
            for g in datasets.general_questions()
        ]
    return asks


def _bucket(side: str, data: AugmentedFacts, qa: QA) -> str:
    """Template facts and question pairs are judged apart (`{side}_facts`, `{side}_pairs`): they differ in how
    much of them a held-out phrasing recalls."""
    return f"{side}_pairs" if is_pair(data.facts[qa.fact]) else f"{side}_facts"


def score(lm: LoadedModel, asks: Sequence[Ask], *, desc: str) -> dict[str, Score]:
    answers = chat_answers(lm, [a.messages for a in asks], max_new_tokens=MAX_NEW_TOKENS, desc=desc)
    out: dict[str, Score] = {}
    for ask, answer in zip(asks, answers):
        s = out.setdefault(ask.bucket, Score())
        ok = contains_answer(answer, ask.expected)
        s.correct += ok
        s.total += 1
        if len(s.samples) < SAMPLES or (not ok and len(s.samples) < 2 * SAMPLES):
            s.samples.append({"question": ask.question, "expected": ask.expected[0], "answer": answer, "ok": str(ok)})
    return out


def perplexity(lm: LoadedModel, texts: Sequence[str] | None = None) -> float:
    """exp(mean token negative log-likelihood) over the shipped general-text passages."""
    import torch

    texts = list(texts if texts is not None else datasets.perplexity_texts())
    nll = 0.0
    count = 0
    with torch.no_grad():
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(lm.device)
            loss = lm.model(input_ids=ids, labels=ids).loss
            n = ids.shape[1] - 1
            nll += float(loss) * n
            count += n
    return math.exp(nll / max(count, 1))


def measure(
    lm: LoadedModel,
    new: AugmentedFacts,
    previous: AugmentedFacts | None,
    *,
    desc: str,
    cached_general: tuple[Score, float] | None = None,
) -> Figures:
    """All figures for the model as it is now (wrap in `adapter_disabled` to measure the base)."""
    scores = score(lm, evaluation_set(new, previous, general=cached_general is None), desc=desc)
    general, ppl = cached_general if cached_general is not None else (scores.get("general", Score()), perplexity(lm))
    return Figures(
        new_facts=scores.get("new_facts", Score()),
        previous_facts=scores.get("previous_facts", Score()),
        general=general,
        retrieval=scores.get("retrieval", Score()),
        counterfactual=scores.get("counterfactual", Score()),
        perplexity=ppl,
        new_pairs=scores.get("new_pairs", Score()),
        previous_pairs=scores.get("previous_pairs", Score()),
    )


@contextlib.contextmanager
def adapter_disabled(lm: LoadedModel) -> Iterator[None]:
    """The base model's behaviour from a peft-wrapped model (or the model itself when none is attached)."""
    disable = getattr(lm.model, "disable_adapter", None)
    if disable is None:
        yield
        return
    with disable():
        yield


def _first_heldout(heldout: Sequence[QA], fact: int) -> str:
    return next(qa.question for qa in heldout if qa.fact == fact)


def score_from_dict(data: dict[str, Any]) -> Score:
    return Score(int(data["correct"]), int(data["total"]), list(data.get("samples", [])))
