"""Retrieval + generation: the domain behind the Answer RPC, free of gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast, get_args

from kfresh.core import metrics
from kfresh.core.config import AnswerConfig
from kfresh.core.errors import NotFound, Overloaded, Unavailable
from kfresh.indexer.documents import Hit
from kfresh.indexer.filters import Filter
from kfresh.prompt import NOT_FOUND_REPLY, PromptFormat, build_messages, closed_book_messages
from kfresh.server import cancellable, reading
from kfresh.server.adapters import BASE_MODEL, AdapterChoice, AdapterManager
from kfresh.server.answer_log import AnswerLog, AnswerRecord, filter_json
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest
from kfresh.server.validation import AnswerQuery

if TYPE_CHECKING:
    from kfresh.indexer.service import Indexer

log = logging.getLogger("kfresh.answer")
REPROBE_S = 1.0  # how often a request may probe a failed generation backend
PROBE_TIMEOUT_S = 1.0  # so UNAVAILABLE still comes back within about a second


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


@dataclass(frozen=True)
class Reading:
    """What an answer reads: the passages shown (prompt order), those a newer one superseded, the conflict's winner."""

    passages: list[Hit]
    superseded: list[Hit]
    primary: Hit | None
    retrieval_ms: float


@dataclass(frozen=True)
class LogAs:
    """How an answer is made and logged: the prompt format, and the logged answer it replays ("" = none)."""

    prompt_format: PromptFormat
    replay_of: str = ""


class Answerer:
    """Retrieves passages, resolves conflicts (newest wins), streams the model's answer, then citations."""

    def __init__(
        self,
        indexer: Indexer,
        backend: GenerationBackend,
        cfg: AnswerConfig,
        *,
        adapters: AdapterManager | None = None,
        answer_log: AnswerLog | None = None,
    ) -> None:
        self._indexer = indexer
        self._backend = backend
        self._cfg = cfg
        self._adapters = adapters
        self._answer_log = answer_log
        self._slots = asyncio.Semaphore(cfg.max_concurrent)
        self._background: set[asyncio.Task[Any]] = set()
        self._probed_at = -REPROBE_S

    async def answer(self, query: AnswerQuery) -> AsyncIterator[AnswerDelta | AnswerResult]:
        await self._admit()
        # The adapter is held for the whole answer: a hot swap meanwhile never unloads it under us.
        async with self._adapter(query.adapter) as adapter, self._slots:
            async for event in self._answer(query, adapter):
                yield event

    async def replay(self, rec: AnswerRecord) -> AsyncIterator[AnswerDelta | AnswerResult]:
        """Ask a logged answer again: its question, the passages it showed (text as shown, whatever the documents
        say now), its adapter version, prompt format, length and temperature; logged with replay_of = its id."""
        await self._admit()
        query = AnswerQuery(
            question=rec.question, k=rec.k, filters=Filter(), closed_book=rec.closed_book, max_tokens=rec.max_tokens,
            temperature=rec.temperature, adapter=rec.adapter or "none", tenant=rec.tenant,
        )  # fmt: skip
        primary = rec.primary_hit
        read = Reading(list(rec.passages), list(rec.superseded), primary, 0.0)
        known = get_args(PromptFormat)
        style = cast(PromptFormat, rec.prompt_format if rec.prompt_format in known else self._cfg.prompt_format)
        async with self._adapter(query.adapter) as adapter, self._slots:
            async for event in self._speak(query, read, adapter, time.perf_counter(), LogAs(style, rec.id)):
                yield event

    async def _admit(self) -> None:
        if not self._backend.ready and not await self._backend_returned():
            raise Unavailable("the generation model is still loading or has failed; retry shortly")
        if self._slots.locked():
            raise Overloaded(f"{self._cfg.max_concurrent} answers are already being generated; retry shortly")

    async def _backend_returned(self) -> bool:
        """Probe a failed backend (a remote server that went down) at most every REPROBE_S, briefly, so
        answers resume when it comes back and a dead backend still fails fast."""
        now = time.monotonic()
        if now - self._probed_at < REPROBE_S:
            return False
        self._probed_at = now
        try:
            return await asyncio.wait_for(self._backend.check_health(), PROBE_TIMEOUT_S) and self._backend.ready
        except Exception:
            return False

    def _adapter(self, requested: str) -> contextlib.AbstractAsyncContextManager[AdapterChoice]:
        if self._adapters is not None:
            return self._adapters.use(requested)
        if requested.strip().lower() not in ("", "none"):
            raise NotFound(
                f"adapter {requested!r} is not available: this server serves no adapters (generation.enable_lora=false)"
            )
        return contextlib.nullcontext(BASE_MODEL)

    def _record_citations(self, passages: list[Hit]) -> None:
        """Log which passages the model was shown (the finetuner prefers cited knowledge); never fails the answer."""
        if not passages:
            return
        pairs = [(h.doc_id, h.version) for h in passages]

        async def record() -> None:
            try:
                await asyncio.to_thread(self._indexer.record_citations, pairs)
            except Exception:
                log.warning("citation_record_failed passages=%d", len(pairs), exc_info=True)

        task = asyncio.create_task(record())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _generate(self, request: GenerationRequest, adapter: AdapterChoice) -> AsyncIterator[GenerationChunk]:
        """The backend's stream. A vLLM server shared by several kfresh replicas may have had this adapter
        unloaded by another one (its swap or its shutdown): then it is loaded again and the request retried once."""
        started = False
        try:
            async for chunk in self._backend.generate(request):
                started = True
                yield chunk
            return
        except NotFound:
            if started or not adapter.version or self._adapters is None:
                raise
        log.warning("adapter_missing version=%s name=%s: the backend lost it (another replica unloaded it?); reloading",
                    adapter.version, adapter.served_name)  # fmt: skip
        await self._adapters.reload(adapter.version)
        async for chunk in self._backend.generate(replace(request, request_id=f"{request.request_id}-retry")):
            yield chunk

    def _start_quote(self, question: str, passages: list[Hit]) -> asyncio.Task[tuple[int, str] | None] | None:
        candidates = reading.quote_candidates(passages)
        if not candidates:
            return None

        def pick() -> tuple[int, str] | None:
            query_vec = self._indexer.query_embeddings.encode(question)  # cached by the search just made
            vectors = self._indexer.embedder.encode([sentence for _, sentence in candidates])
            return reading.pick_quote(query_vec, candidates, vectors)

        return asyncio.create_task(asyncio.to_thread(pick))

    async def _finish_quote(self, quoting: asyncio.Task[tuple[int, str] | None] | None, answer: str) -> str:
        """The quote to append; a failure to pick one is logged and never fails the answer. A model that said the
        passages do not answer (a reader trained to refuse) gets no quote: it would contradict the reply."""
        if quoting is None or reading.is_refusal(answer):
            return ""
        try:
            picked = await quoting
        except Exception:
            log.warning("quote_failed", exc_info=True)
            return ""
        return reading.format_quote(*picked, answer) if picked else ""

    async def _not_found(
        self, query: AnswerQuery, reading: Reading, adapter: AdapterChoice, answer_id: str, log_as: LogAs
    ) -> AsyncIterator[AnswerDelta | AnswerResult]:
        """No passage cleared the bar: say so rather than let a small model invent an answer (no generation)."""
        ms = reading.retrieval_ms
        log.info("answer_not_found id=%s retrieval_ms=%.1f superseded=%d", answer_id, ms, len(reading.superseded))
        metrics.RETRIEVE_DURATION.observe(ms / 1000)
        yield AnswerDelta(NOT_FOUND_REPLY)
        result = AnswerResult(
            citations=[], superseded=reading.superseded, primary=None, retrieval_ms=ms, ttft_ms=ms, total_ms=ms,
            finish_reason="not_found", output_tokens=0, model=self._backend.model, adapter=adapter.version,
            request_id=answer_id,
        )  # fmt: skip
        self._log(query, reading, result, NOT_FOUND_REPLY, log_as)
        yield result

    def _retrieve(self, query: AnswerQuery, *, cancel: threading.Event | None = None) -> list[Hit]:
        """The retrieved pool the reading step selects from (reading.fetch_size: wider than k when it reranks)."""
        fetch = reading.fetch_size(query.k, self._cfg, self._indexer.cfg.retrieval.max_k)
        return self._indexer.search(
            query.question, fetch, query.filters or None, with_vectors=True, default_k=self._cfg.default_k,
            as_of=query.as_of, valid_at=query.valid_at, cancel=cancel,
        )  # fmt: skip

    async def _read(self, query: AnswerQuery) -> Reading:
        """Retrieve, then the reading step (reading.select: rerank, resolve conflicts, the passages shown)."""
        start = time.perf_counter()
        if query.closed_book:
            return Reading([], [], None, 0.0)
        pool = await cancellable.in_thread(self._retrieve, query)  # a cancelled Answer stops its search
        passages, resolved = reading.select(query.question, pool, query.k or self._cfg.default_k, self._cfg)
        return Reading(passages, resolved.superseded, resolved.primary, (time.perf_counter() - start) * 1000)

    async def _answer(self, query: AnswerQuery, adapter: AdapterChoice) -> AsyncIterator[AnswerDelta | AnswerResult]:
        start = time.perf_counter()
        read = await self._read(query)
        async for event in self._speak(query, read, adapter, start, LogAs(self._cfg.prompt_format)):
            yield event

    async def _speak(
        self, query: AnswerQuery, read: Reading, adapter: AdapterChoice, start: float, log_as: LogAs
    ) -> AsyncIterator[AnswerDelta | AnswerResult]:
        """Generate from what was read (or replayed): the model's answer, its quote, then the result."""
        answer_id = f"answer-{uuid.uuid4().hex}"
        passages = read.passages
        if not query.closed_book and not passages and self._cfg.refuse_without_passages:
            async for event in self._not_found(query, read, adapter, answer_id, log_as):
                yield event
            return
        messages = (
            closed_book_messages(query.question)
            if query.closed_book
            else build_messages(query.question, passages, style=log_as.prompt_format)
        )
        request = GenerationRequest(
            request_id=answer_id,
            messages=messages,
            max_tokens=query.max_tokens,
            temperature=query.temperature,
            adapter=adapter.served_name,
        )
        if not log_as.replay_of:  # a replay is not traffic: the finetuner counts real answers' citations only
            self._record_citations(passages)
        # The quote is picked while the model decodes, after its first token: embedding the candidate sentences
        # during the prefill took CPU from it on a 2-core box (TTFT +15 ms).
        want_quote = self._cfg.quote and not query.closed_book
        quoting: asyncio.Task[tuple[int, str] | None] | None = None
        ttft_ms = 0.0
        finish_reason = ""
        tokens = 0
        said: list[str] = []
        try:
            async for chunk in self._generate(request, adapter):
                if chunk.text:
                    if not ttft_ms:
                        ttft_ms = (time.perf_counter() - start) * 1000
                    said.append(chunk.text)
                    yield AnswerDelta(chunk.text)
                    if want_quote:
                        want_quote, quoting = False, self._start_quote(query.question, passages)
                tokens = max(tokens, chunk.output_tokens)
                if chunk.finished:
                    finish_reason = chunk.finish_reason or "stop"
            if want_quote:  # the model said nothing: the quote is the whole answer
                quoting = self._start_quote(query.question, passages)
            text = "".join(said)
            quote = await self._finish_quote(quoting, text)
            if not query.closed_book and reading.is_refusal(text):
                finish_reason = "not_found"
            if quote:
                said.append(quote)
                yield AnswerDelta(quote)
        finally:
            if quoting is not None and not quoting.done():
                quoting.cancel()
        total_ms = (time.perf_counter() - start) * 1000
        metrics.RETRIEVE_DURATION.observe(read.retrieval_ms / 1000)
        if ttft_ms:
            metrics.TTFT.observe(ttft_ms / 1000)
        metrics.OUTPUT_TOKENS.labels(adapter=adapter.version).inc(tokens)
        metrics.GENERATION_SECONDS.inc((total_ms - read.retrieval_ms) / 1000)
        log.info(
            "answer id=%s adapter=%s passages=%d superseded=%d retrieval_ms=%.1f ttft_ms=%.1f total_ms=%.1f tokens=%d%s",
            answer_id,
            adapter.version or "base",
            len(passages),
            len(read.superseded),
            read.retrieval_ms,
            ttft_ms,
            total_ms,
            tokens,
            f" replay_of={log_as.replay_of}" if log_as.replay_of else "",
        )
        result = AnswerResult(
            citations=passages,
            superseded=read.superseded,
            primary=read.primary,
            retrieval_ms=read.retrieval_ms,
            ttft_ms=ttft_ms,
            total_ms=total_ms,
            finish_reason=finish_reason,
            output_tokens=tokens,
            model=self._backend.model,
            adapter=adapter.version,
            request_id=answer_id,
        )
        self._log(query, read, result, "".join(said), log_as)
        yield result

    def _log(self, query: AnswerQuery, read: Reading, result: AnswerResult, text: str, log_as: LogAs) -> None:
        if self._answer_log is None:
            return
        primary = next((i for i, h in enumerate(read.passages) if h is read.primary), -1)
        self._answer_log.record(
            AnswerRecord(
                id=result.request_id, at=time.time() - result.total_ms / 1000, question=query.question, answer=text,
                model=result.model, adapter=result.adapter, finish_reason=result.finish_reason,
                output_tokens=result.output_tokens, closed_book=query.closed_book, prompt_format=log_as.prompt_format,
                passages=tuple(read.passages), primary=primary, superseded=tuple(read.superseded), k=query.k,
                max_tokens=query.max_tokens, temperature=query.temperature, filters=filter_json(query.filters),
                retrieval_ms=result.retrieval_ms, ttft_ms=result.ttft_ms, total_ms=result.total_ms,
                tenant=dict(query.tenant), replay_of=log_as.replay_of, as_of=query.as_of, valid_at=query.valid_at,
            )
        )  # fmt: skip
