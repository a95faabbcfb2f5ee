"""The document store seam: what the indexer, its worker and the finetuner need from durable storage.

Every backend (SQLite in `sqlite.py`, PostgreSQL in `postgres.py`) has the same semantics: an Ack is
returned only after the commit is durable; an identical re-send is "unchanged"; a delete is a new version;
the change log's seq order is its commit order; chunk ids are int64 FAISS ids that are never reused.
Failures leave every method as `StoreError`, so callers map them to gRPC codes without knowing the backend.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self, TypeVar

import numpy as np

from kfresh.indexer.documents import Ack, DocumentIn, WriteOp
from kfresh.indexer.rows import (
    Applied,
    ChangeRow,
    ChunkHitRow,
    ChunkRow,
    DocAttrs,
    DocRecord,
    DocState,
    Erased,
    HistoryRow,
    LoggedAnswerRow,
)

F = TypeVar("F", bound=Callable[..., Any])


class StoreError(Exception):
    """A store operation failed. `full`: out of space (SQLITE_FULL, SQLSTATE 53100); retry once space is freed."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


def translate_errors(errors: type[BaseException] | tuple[type[BaseException], ...],
                     is_full: Callable[[BaseException], bool]) -> Callable[[F], F]:  # fmt: skip
    """Decorator factory: a backend's `errors` leave the decorated method (or generator) as StoreError."""

    def wrap(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from fn(*args, **kwargs)
                except errors as exc:
                    raise StoreError(_first_line(exc), full=is_full(exc)) from exc

            return gen  # type: ignore[return-value]

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors as exc:
                raise StoreError(_first_line(exc), full=is_full(exc)) from exc

        return call  # type: ignore[return-value]

    return wrap


def _first_line(exc: BaseException) -> str:
    """The backend's message without PostgreSQL's DETAIL/CONTEXT lines (those stay on __cause__ for the log)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class DocumentStore(abc.ABC):
    """Documents, chunks (with embeddings), an append-only change log and citations. Thread-safe.

    `read_only` stores (the finetuner's view) refuse every write at the database level.
    """

    read_only: bool = False

    # -- writes from clients -----------------------------------------------------------------------
    def upsert(self, doc: DocumentIn, chunks: Sequence[str], *, now: float | None = None) -> Ack:
        """Store a new version of `doc` with its chunks (status "stored"), or nothing ("unchanged")."""
        return self.write_many([WriteOp(doc.id, doc, tuple(chunks))], now=now)[0]

    def delete(self, doc_id: str, *, now: float | None = None) -> Ack:
        """Mark `doc_id` deleted under a new version ("deleted"), or "not_found"."""
        return self.write_many([WriteOp(doc_id)], now=now)[0]

    @abc.abstractmethod
    def write_many(self, ops: Sequence[WriteOp], *, now: float | None = None) -> list[Ack]:
        """upsert/delete each op in order inside ONE transaction (a group commit: one durable flush for all);
        all acks or, on error, nothing committed. An op whose `owner` binding a live document outside it holds the
        id of gets a "forbidden" ack and ends the list there: the ops before it commit, the ones after it are not
        applied (fewer acks than ops)."""

    @abc.abstractmethod
    def record_citations(self, pairs: Sequence[tuple[str, int]], *, now: float | None = None) -> int:
        """Append one (doc_id, version) row per passage an answer showed the model; returns how many."""

    @abc.abstractmethod
    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        """How often each (doc_id, version) was shown to the model since `since` (unix seconds)."""

    @abc.abstractmethod
    def record_answer(self, answer: LoggedAnswerRow, shown: Sequence[tuple[str, int]],
                      superseded: Sequence[tuple[str, int]] = ()) -> None:  # fmt: skip
        """Add one answer to the answer log: the row (its body stored as JSON), the (doc_id, version) passages it
        showed the model and those a newer passage superseded. An id already logged is an error."""

    @abc.abstractmethod
    def logged_questions(self, versions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], list[str]]:
        """For each (doc_id, version): the distinct questions of logged answers (replays left out) that showed
        it to the model, oldest first: real traffic the finetuner may learn from."""

    @abc.abstractmethod
    def erase(self, doc_id: str) -> Erased | None:
        """Erase what is left of a DELETED document (a purge): its text, metadata and source (the row stays as a
        bare tombstone: id, version, deleted), every version's attributes, history and chunk rows, its citations,
        and every logged answer that showed or superseded it. The change log keeps its rows (ids and version numbers only:
        the replicas follow it), and the erasure is logged (`erased_since`: in-memory history copies drop it). None
        when `doc_id` was never stored; InvalidInput when it is live."""

    @abc.abstractmethod
    def history_rows(self, *, doc_ids: Sequence[str] | None = None) -> list[HistoryRow]:
        """Every version the history holds (of `doc_ids` only, when given), by doc_id and version: its attributes,
        when it was acknowledged and when it ended (the next version or a delete). Purged documents have none.
        `indexer/timeline.py` keeps them in memory."""

    @abc.abstractmethod
    def history_counts(self) -> tuple[int, int]:
        """(versions the history holds, chunk rows of replaced versions)."""

    @abc.abstractmethod
    def history_mark(self) -> tuple[int, int]:
        """(newest change seq, newest erasure seq): the history changed since a mark iff either moved. Every new
        version and every end of one is a change; a purge (`erase`) is an erasure."""

    @abc.abstractmethod
    def erased_since(self, seq: int) -> list[tuple[int, str]]:
        """(erasure seq, doc_id) of every purge after `seq`, in order."""

    @abc.abstractmethod
    def chunk_texts(self, chunk_ids: Sequence[int]) -> dict[int, str]:
        """chunk_id -> text of the given chunks, current (chunks) or replaced (history_chunks); erased ones absent."""

    @abc.abstractmethod
    def slice_chunks(self, versions: Sequence[HistoryRow]) -> list[tuple[HistoryRow, ChunkRow]]:
        """The chunk rows of the given versions, current ones and replaced ones (history_chunks) alike, in order
        of doc_id, version and ordinal, with their embeddings where stored."""

    @abc.abstractmethod
    def logged_answer(self, answer_id: str) -> LoggedAnswerRow | None:
        """One answer of the log, or None (never logged, or pruned)."""

    @abc.abstractmethod
    def prune_answers(self, before: float) -> int:
        """Drop the answers logged before `before` (unix seconds); returns how many."""

    # -- the worker's side -------------------------------------------------------------------------
    @abc.abstractmethod
    def current(self, doc_id: str) -> DocState | None:
        """The acknowledged version of `doc_id` with its latest change seq, or None if never stored."""

    @abc.abstractmethod
    def chunks_for(self, doc_id: str, version: int) -> list[ChunkRow]:
        """The chunk rows of one version, in order, with their embeddings where saved."""

    @abc.abstractmethod
    def attrs_of(self, versions: Sequence[tuple[str, int]]) -> dict[str, DocAttrs]:
        """doc_id -> metadata, source and valid_from of the given version of each (doc_id, version) whose
        attributes are still stored (every indexed version's are): what filtered search is planned on."""

    @abc.abstractmethod
    def live_metadata(self, doc_ids: Sequence[str], *, deleted_too: bool = False) -> dict[str, dict[str, str]]:
        """doc_id -> metadata of the acknowledged version, for each of `doc_ids` that is stored and not deleted (or
        deleted too: a tombstone keeps its last metadata until a purge empties it)."""

    @abc.abstractmethod
    def save_applied(self, applied: Sequence[Applied]) -> None:
        """Persist a micro-batch the worker made searchable: embeddings, indexed_at/lag, stale rows gone."""

    @abc.abstractmethod
    def cleanup_stale(self) -> int:
        """Drop chunk rows of superseded or deleted versions; returns how many chunks went."""

    @abc.abstractmethod
    def ensure_embedder(self, name: str, dim: int) -> bool:
        """Record the embedder; if a different one made the stored vectors, forget them. True if forgotten."""

    # -- reads for search and recovery -------------------------------------------------------------
    @abc.abstractmethod
    def lookup(self, chunk_ids: Sequence[int], *, with_vectors: bool = False) -> dict[int, ChunkHitRow]:
        """Resolve index ids to chunk rows with their version's attributes; unknown ids are absent."""

    @abc.abstractmethod
    def iter_embedded(self, *, batch: int = 8192) -> Iterator[tuple[list[str], list[int], np.ndarray, np.ndarray]]:
        """Yield (doc_ids, versions, chunk_ids, vectors) of every live, embedded current-version chunk."""

    @abc.abstractmethod
    def docs_changed_since(self, seq: int) -> list[str]:
        """Documents with a change after `seq`, ordered by their last change."""

    @abc.abstractmethod
    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        """(seq, doc_id, version, op) of every change after `seq`, in seq (= commit) order."""

    @abc.abstractmethod
    def current_changes(self, after_seq: int, upto_seq: int, limit: int) -> list[ChangeRow]:
        """Changes with after_seq < seq <= upto_seq whose version is still current (at most `limit`, seq order),
        with that version's ack time, index time and lag, source, metadata and valid_from (a delete: the last ones)."""

    @abc.abstractmethod
    def unembedded(self) -> list[tuple[DocState, int]]:
        """Live documents whose current version still lacks embeddings, with their chunk counts."""

    @abc.abstractmethod
    def max_seq(self) -> int:
        """The newest committed change seq (0 for an empty log)."""

    @abc.abstractmethod
    def wait_for_change(self, after_seq: int, timeout_s: float) -> bool:
        """True as soon as max_seq() > after_seq (a change committed, by any writer); False on timeout."""

    @abc.abstractmethod
    def counts(self) -> tuple[int, int, int]:
        """(live documents, chunks of their current versions, deleted documents)."""

    # -- the finetuner's read-only view ------------------------------------------------------------
    @abc.abstractmethod
    def documents(self) -> list[DocRecord]:
        """Every document's current row, deleted ones too, ordered by (valid_from, doc_id)."""

    @abc.abstractmethod
    def cited_versions(self) -> set[tuple[str, int]]:
        """(doc_id, version) pairs that answers have cited."""

    @abc.abstractmethod
    def supersedes_of(self, doc_ids: Sequence[str]) -> dict[str, list[str]]:
        """For those of `doc_ids` that are live and supersede other documents: the ids they supersede."""

    # -- lifecycle ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """Release every connection; idempotent. Later calls raise StoreError."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
