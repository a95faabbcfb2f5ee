"""The reading step as pure functions: which passages the model reads, and the sentence quoted after its answer.

Measured on real news (`kfresh bench reading`, RealTimeQA): SmolLM2-135M loses the answer while rewording a
passage far more often than it picks the wrong passage, and the evidence's own sentence holds the right
answer more often than the model's free answer does, and fewer passages read better than more. So the
model is shown the best passage(s) only (`answer.prompt_passages`), and after its answer the sentence of
those passages that best matches the question is quoted verbatim (`answer.quote`), picked by the embedder:
the reader sees the model's words and the source's words side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kfresh.core.text import split_sentences
from kfresh.indexer.documents import Hit


def shown_passages(kept: Sequence[Hit], n: int) -> list[Hit]:
    """The `n` best-scoring passages that survived conflict resolution, back in their display order (oldest
    first). Measured on real news: SmolLM2-135M reads one good passage better than three."""
    if n <= 0 or len(kept) <= n:
        return list(kept)
    best = sorted(kept, key=lambda h: -h.score)[:n]
    return [h for h in kept if any(h is b for b in best)]


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


def format_quote(number: int, sentence: str, answer: str) -> str:
    """The text appended after the model's answer, or "" when the answer already holds the sentence."""
    if " ".join(sentence.split()).lower() in " ".join(answer.split()).lower():
        return ""
    lead = "\n\n" if answer.strip() else ""
    return f'{lead}[{number}] "{sentence}"'
