"""Retrieval + generation: the domain behind the Answer RPC, free of gRPC."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kfresh.config import AnswerConfig
from kfresh.errors import NotFound, Overloaded, Unavailable
from kfresh.indexer.documents import Hit
from kfresh.server.generation.base import GenerationBackend, GenerationRequest
from kfresh.server.prompting import build_messages, closed_book_messages, resolve_conflicts
from kfresh.server.validation import AnswerQuery

if TYPE_CHECKING:
    from kfresh.indexer.service import Indexer

log = logging.getLogger("kfresh.answer")


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class AnswerResult:
    citations: list[Hit]
    superseded: list[Hit]
    primary: Hit | None
    retrieval_ms: float
    ttft_ms: float
    total_ms: float
    finish_reason: str
    output_tokens: int
    model: str
    adapter: str = ""
    request_id: str = field(default="")


class Answerer:
    """Retrieves passages, resolves conflicts (newest wins), streams the model's answer, then citations."""

    def __init__(self, indexer: Indexer, backend: GenerationBackend, cfg: AnswerConfig) -> None:
        self._indexer = indexer
        self._backend = backend
        self._cfg = cfg
        self._slots = asyncio.Semaphore(cfg.max_concurrent)

    async def answer(self, query: AnswerQuery) -> AsyncIterator[AnswerDelta | AnswerResult]:
        if not self._backend.ready:
            raise Unavailable("the generation model is still loading or has failed; retry shortly")
        if self._slots.locked():
            raise Overloaded(f"{self._cfg.max_concurrent} answers are already being generated; retry shortly")
        if query.adapter not in ("", "none"):
            # Adapter publishing arrives with the finetuner; until then only the base model exists.
            raise NotFound(f"adapter {query.adapter!r} is not published; use '' or 'none' for the base model")
        async with self._slots:
            async for event in self._answer(query):
                yield event

    async def _answer(self, query: AnswerQuery) -> AsyncIterator[AnswerDelta | AnswerResult]:
        start = time.perf_counter()
        passages: list[Hit] = []
        superseded: list[Hit] = []
        primary: Hit | None = None
        if not query.closed_book:
            hits = await asyncio.to_thread(
                self._indexer.search, query.question, query.k, query.filters or None, with_vectors=True
            )
            resolved = resolve_conflicts(
                hits,
                similarity=self._cfg.conflict_similarity,
                min_score=self._cfg.min_score,
                score_margin=self._cfg.score_margin,
            )
            passages, superseded, primary = resolved.kept, resolved.superseded, resolved.primary
        retrieval_ms = (time.perf_counter() - start) * 1000
        messages = build_messages(query.question, passages) if not query.closed_book else closed_book_messages(query.question)
        request = GenerationRequest(
            request_id=f"answer-{uuid.uuid4().hex}",
            messages=messages,
            max_tokens=query.max_tokens,
            temperature=query.temperature,
            adapter=None,
        )
        ttft_ms = 0.0
        finish_reason = ""
        tokens = 0
        async for chunk in self._backend.generate(request):
            if chunk.text:
                if not ttft_ms:
                    ttft_ms = (time.perf_counter() - start) * 1000
                yield AnswerDelta(chunk.text)
            tokens = max(tokens, chunk.output_tokens)
            if chunk.finished:
                finish_reason = chunk.finish_reason or "stop"
        total_ms = (time.perf_counter() - start) * 1000
        log.info(
            "answer id=%s passages=%d superseded=%d retrieval_ms=%.1f ttft_ms=%.1f total_ms=%.1f tokens=%d",
            request.request_id, len(passages), len(superseded), retrieval_ms, ttft_ms, total_ms, tokens,
        )
        yield AnswerResult(
            citations=passages,
            superseded=superseded,
            primary=primary,
            retrieval_ms=retrieval_ms,
            ttft_ms=ttft_ms,
            total_ms=total_ms,
            finish_reason=finish_reason,
            output_tokens=tokens,
            model=self._backend.model,
            request_id=request.request_id,
        )
