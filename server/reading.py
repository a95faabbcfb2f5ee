"""The reading step as pure functions: which passages the model reads, and the sentence quoted after its answer.

Measured on real news (`kfresh bench reading`, RealTimeQA): SmolLM2-135M loses the answer while rewording a
passage far more often than it picks the wrong passage, and the evidence's own sentence holds the right
answer more often than the model's free answer does, and fewer passages read better than more. So the
model is shown the best passage(s) only (`answer.prompt_passages`), and after its answer the sentence of
those passages that best matches the question is quoted verbatim (`answer.quote`), picked by the embedder:
the reader sees the model's words and the source's words side by side.

Which passage is "best" is decided by `rerank`: the embedder's cosine plus a bonus for covering the
question's rare words. MiniLM often ranks a story on the same subject from another week above the one that
names the question's people and places; on January-September questions the bonus lifted the evidence to
the top from 0.679 to 0.713 of questions (`kfresh bench reading` reports it on October-December).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kfresh.core.config import AnswerConfig
from kfresh.core.text import content_words, names, split_sentences
from kfresh.indexer.documents import Hit
from kfresh.prompt import NOT_FOUND_REPLY, Asked, Resolved, resolve_conflicts


def coverage(question: str, passages: Sequence[str]) -> list[float]:
    """How much of the question's rare words each passage holds, in [0, 1]: the IDF-weighted share of the
    question's content words it contains. IDF comes from `passages` themselves (the retrieved neighbourhood),
    so a word every neighbour shares ("Ukraine" in a pool of Ukraine stories) counts little and the name
    that tells them apart counts much; no corpus statistics to keep in step with ingest."""
    asked = content_words(question)
    held = [content_words(p) for p in passages]
    if not asked or not held:
        return [0.0] * len(passages)
    n = len(held)
    idf = {w: math.log((n + 1) / (sum(w in h for h in held) + 0.5)) for w in asked}
    total = sum(idf.values())
    return [sum(idf[w] for w in asked if w in h) / total if total > 0 else 0.0 for h in held]


def rerank(question: str, hits: Sequence[Hit], weight: float) -> list[tuple[Hit, float]]:
    """(hit, reading score) best first: cosine + `weight` x coverage of the question's rare words. The pool
    should be wider than k (answer.rerank_pool) so the IDF sees the neighbourhood; weight 0 keeps the order."""
    if weight <= 0 or not hits:
        return [(h, h.score) for h in hits]
    bonus = coverage(question, [h.text for h in hits])
    scored = [(h, h.score + weight * b) for h, b in zip(hits, bonus, strict=True)]
    return sorted(scored, key=lambda pair: -pair[1])


NAME_MAX_PASSAGES = 2
"""A name the question asks about tells versions of one story apart from its neighbours only when at most this
many passages of the retrieved pool hold it (the story and its correction), unlike "Trump" or "Ukraine"."""


def asked(question: str, pool: Sequence[str]) -> Asked:
    """What the question asks about, for prompt.resolve_conflicts: its content words, and the names among them
    (capitalised in the passages) that at least one and at most NAME_MAX_PASSAGES passages of the retrieved
    `pool` hold: the subject two passages may share."""
    words = content_words(question)
    held = [names(p) & words for p in pool]
    named = frozenset(w for w in words if 0 < sum(w in h for h in held) <= NAME_MAX_PASSAGES)
    return Asked(words=frozenset(words), names=named)


def fetch_size(requested_k: int, cfg: AnswerConfig, max_k: int) -> int:
    """How many passages to retrieve for an answer of `requested_k` (0 = answer.default_k): a pool of
    answer.rerank_pool (at most `max_k`) when the reading step reranks, so a passage naming the question's rare
    words can move up into k. A k the request got wrong is passed on as it is, for the indexer to reject."""
    k = requested_k or cfg.default_k
    pool = min(cfg.rerank_pool, max_k)
    return pool if cfg.rerank_weight and 0 <= requested_k <= pool and k < pool else requested_k


def shown_passages(kept: Sequence[Hit], n: int, score: Callable[[Hit], float] | None = None) -> list[Hit]:
    """The `n` best passages (by `score`, default the retrieval score) that survived conflict resolution, back
    in their display order (oldest first). Measured on real news: SmolLM2-135M reads one good passage better
    than three."""
    if n <= 0 or len(kept) <= n:
        return list(kept)
    key = score or (lambda h: h.score)
    best = sorted(kept, key=lambda h: -key(h))[:n]
    return [h for h in kept if any(h is b for b in best)]


def select(question: str, pool: Sequence[Hit], k: int, cfg: AnswerConfig) -> tuple[list[Hit], Resolved]:
    """What the model reads of a retrieved `pool`, in display order, and the conflict resolution behind it:
    rerank the pool, keep the best `k`, drop superseded and weak passages (prompt.resolve_conflicts, with
    the question's words and the names that tell its story apart in the pool: `asked`), then the best
    `answer.prompt_passages`."""
    subject = asked(question, [h.text for h in pool])
    ranked = rerank(question, pool, cfg.rerank_weight)[:k]
    score = {id(h): s for h, s in ranked}
    resolved = resolve_conflicts(
        [h for h, _ in ranked],
        similarity=cfg.conflict_similarity,
        min_score=cfg.min_score,
        score_margin=cfg.score_margin,
        asked=subject,
        named_similarity=cfg.named_conflict_similarity,
    )
    return shown_passages(resolved.kept, cfg.prompt_passages, lambda h: score[id(h)]), resolved


def quote_candidates(passages: Sequence[Hit]) -> list[tuple[int, str]]:
    """(1-based passage number as shown, sentence) for every sentence of the shown passages."""
    return [(n, s) for n, hit in enumerate(passages, start=1) for s in split_sentences(hit.text)]


def pick_quote(
    query_vec: np.ndarray, candidates: Sequence[tuple[int, str]], vectors: np.ndarray
) -> tuple[int, str] | None:
    """The candidate sentence closest to the question (cosine of unit vectors); ties go to the later passage
    (the newer one, as passages are shown oldest first)."""
    if not candidates:
        return None
    scores = np.asarray(vectors, dtype=np.float32) @ np.asarray(query_vec, dtype=np.float32)
    best = max(range(len(candidates)), key=lambda i: (round(float(scores[i]), 6), candidates[i][0]))
    return candidates[best]


def is_refusal(answer: str) -> bool:
    """The model's answer is the "not in the documents" reply (a reader trained to refuse says it)."""
    return " ".join(answer.split()).lower().startswith(NOT_FOUND_REPLY.lower().rstrip("."))


def format_quote(number: int, sentence: str, answer: str) -> str:
    """The text appended after the model's answer, or "" when the answer already holds the sentence."""
    if " ".join(sentence.split()).lower() in " ".join(answer.split()).lower():
        return ""
    lead = "\n\n" if answer.strip() else ""
    return f'{lead}[{number}] "{sentence}"'
