"""The answer log: each answer's question, the passages shown (document, version, text as shown), the adapter,
the answer text and the timings, kept `answer_log.retention_days` in the document store (tables `answers` and
`answer_passages`). `kfresh explain ID` prints one; `kfresh replay ID` asks it again with the same passages and
adapter. Request metadata (bearer tokens) never reaches it: only what the answer itself was made of.

Writes happen after the answer, off its path (a background task per answer); reading an id whose write is still
in flight waits for it, so a client may explain an answer the moment its AnswerDone arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kfresh.core.config import AnswerLogConfig
from kfresh.core.errors import NotFound
from kfresh.indexer.documents import Hit
from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import LoggedAnswerRow

if TYPE_CHECKING:
    from kfresh.indexer.service import Indexer

log = logging.getLogger("kfresh.answer_log")
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class AnswerRecord:
    """One answer as logged: enough to explain it and to ask it again with the same passages and adapter."""

    id: str
    at: float
    question: str
    answer: str
    model: str
    adapter: str  # the adapter version that answered; "" = the base model
    finish_reason: str
    output_tokens: int
    closed_book: bool
    prompt_format: str
    passages: tuple[Hit, ...]  # shown to the model, in prompt order ([1], [2], ...)
    primary: int  # index into `passages` of the passage that won a conflict; -1 = none
    superseded: tuple[Hit, ...]
    k: int
    max_tokens: int
    temperature: float
    filters: dict[str, Any] = field(default_factory=dict)
    retrieval_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    tenant: dict[str, str] = field(default_factory=dict)
    replay_of: str = ""  # the logged answer this one replayed
    as_of: float | None = None  # the history slice the answer read, when it asked for one
    valid_at: float | None = None

    @property
    def primary_hit(self) -> Hit | None:
        """The passage that won a conflict, if any."""
        return self.passages[self.primary] if 0 <= self.primary < len(self.passages) else None

    def body(self) -> dict[str, Any]:
        """Everything but id, time and question (their own columns), as JSON values."""
        body = asdict(self)
        for key in ("id", "at", "question"):
            del body[key]
        body["passages"] = [_hit_json(h) for h in self.passages]
        body["superseded"] = [_hit_json(h) for h in self.superseded]
        return body

    @classmethod
    def from_row(cls, row: LoggedAnswerRow) -> AnswerRecord:
        body = dict(row.body)
        body["passages"] = tuple(_hit(h) for h in body.get("passages", []))
        body["superseded"] = tuple(_hit(h) for h in body.get("superseded", []))
        known = set(cls.__dataclass_fields__) - {"id", "at", "question"}
        return cls(id=row.answer_id, at=row.at, question=row.question, **{k: v for k, v in body.items() if k in known})


def filter_json(f: Filter) -> dict[str, Any]:
    """A filter as the log keeps it (only the parts that were set)."""
    out: dict[str, Any] = {}
    if f.equals:
        out["equals"] = dict(f.equals)
    if f.any_of:
        out["any_of"] = {k: sorted(v) for k, v in f.any_of.items()}
    if f.sources:
        out["sources"] = list(f.sources)
    if f.valid_from_min is not None:
        out["valid_from_min"] = f.valid_from_min
    if f.valid_from_max is not None:
        out["valid_from_max"] = f.valid_from_max
    return out


def _hit_json(h: Hit) -> dict[str, Any]:
    return {
        "doc_id": h.doc_id, "version": h.version, "chunk_id": h.chunk_id, "ordinal": h.ordinal, "text": h.text,
        "score": h.score, "source": h.source, "valid_from": h.valid_from, "metadata": dict(h.metadata),
        "supersedes": list(h.supersedes), "acked_at": h.acked_at,
    }  # fmt: skip


def _hit(d: dict[str, Any]) -> Hit:
    return Hit(
        doc_id=d["doc_id"], version=int(d["version"]), chunk_id=int(d["chunk_id"]), ordinal=int(d["ordinal"]),
        text=d["text"], score=float(d["score"]), source=d["source"], valid_from=float(d["valid_from"]),
        metadata=dict(d["metadata"]), supersedes=tuple(d["supersedes"]), acked_at=d.get("acked_at"),
    )  # fmt: skip


class AnswerLog:
    """Writes answers in the background, reads them back (waiting for a write in flight), prunes hourly."""

    def __init__(self, indexer: Indexer, cfg: AnswerLogConfig) -> None:
        self._indexer = indexer
        self._cfg = cfg
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._pruned_at = -PRUNE_EVERY_S
        self.written = 0
        self.failed = 0

    def record(self, rec: AnswerRecord) -> None:
        """Log `rec` off the answer's path; a failure is logged and counted, never raised into the answer."""
        task = asyncio.create_task(self._write(rec))
        self._pending[rec.id] = task
        task.add_done_callback(lambda _: self._pending.pop(rec.id, None))

    async def _write(self, rec: AnswerRecord) -> None:
        row = LoggedAnswerRow(rec.id, rec.at, rec.question, rec.body(), rec.replay_of)
        shown = [(h.doc_id, h.version) for h in rec.passages]
        # Superseded passages are listed too: their text is in the body, so a purge of their document erases it.
        superseded = [(h.doc_id, h.version) for h in rec.superseded]
        try:
            await asyncio.to_thread(self._indexer.record_answer, row, shown, superseded)
            self.written += 1
        except Exception:
            self.failed += 1
            log.warning("answer_log_write_failed id=%s", rec.id, exc_info=True)
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            await self.prune()

    async def prune(self, *, now: float | None = None) -> int:
        """Drop answers older than the retention; returns how many (0 after a failure, which is logged)."""
        self._pruned_at = time.monotonic()
        before = (time.time() if now is None else now) - self._cfg.retention_days * 86400
        try:
            n = await asyncio.to_thread(self._indexer.prune_answers, before)
        except Exception:
            log.warning("answer_log_prune_failed", exc_info=True)
            return 0
        if n:
            log.info("answer_log.pruned answers=%d retention_days=%g", n, self._cfg.retention_days)
        return n

    async def get(self, answer_id: str, *, tenant: dict[str, str] | None = None) -> AnswerRecord:
        """The logged answer; NotFound when unknown, past the retention, or (with `tenant`) another tenant's."""
        pending = self._pending.get(answer_id)
        if pending is not None:
            await asyncio.shield(pending)
        row = await asyncio.to_thread(self._indexer.logged_answer, answer_id)
        if row is None:
            raise NotFound(
                f"answer {answer_id!r} is not in the answer log (unknown, or older than "
                f"answer_log.retention_days={self._cfg.retention_days:g})"
            )
        rec = AnswerRecord.from_row(row)
        if tenant and any(rec.tenant.get(k) != v for k, v in tenant.items()):
            raise NotFound(f"answer {answer_id!r} is not in the answer log")  # another tenant's: as if absent
        return rec

    async def close(self) -> None:
        """Wait for the writes in flight (a server's shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)
