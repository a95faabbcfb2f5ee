"""What the SQL stores share: every method whose body is the same on SQLite and PostgreSQL, written once.

A backend (sqlite.py, postgres.py) supplies only its dialect and its connections:
  _p            the driver's parameter placeholder ("?" or "%s");
  _writes       its module of write transactions (sqlite_writes, pg_writes: the same functions, its SQL);
  _txn()        one durable write transaction (its connection or cursor);
  _fetchall()   one read on a reader connection;
and names its error translation as a class keyword, `class SqliteStore(SqlStore, errors=_errors)`, where
`_errors = translate_errors(<driver's Error>, <disk-full test>)`: the shared methods are wrapped with it in that
class, so their driver errors leave as StoreError exactly as the backend's own methods' do.
The rest (lookup, iter_embedded, wait_for_change, close) differs and stays in the backend.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any, ClassVar, TypeVar

from kfresh.core.errors import InvalidInput
from kfresh.indexer.documents import Ack, WriteOp
from kfresh.indexer.rows import (
    Applied,
    ChangeRow,
    ChunkRow,
    DocAttrs,
    DocRecord,
    DocState,
    Erased,
    HistoryRow,
    LoggedAnswerRow,
    doc_record,
    vec_from_blob,
)
from kfresh.indexer.stores.base import DocumentStore

log = logging.getLogger("kfresh.indexer")

F = TypeVar("F", bound=Callable[..., Any])


def _shared(fn: F) -> F:
    """Marks a method the backend classes wrap with their `_errors` (SqlStore.__init_subclass__)."""
    fn.__kfresh_shared__ = True  # type: ignore[attr-defined]
    return fn


class SqlStore(DocumentStore):
    """A DocumentStore over a SQL database; the backend subclasses supply the dialect hooks."""

    _p: ClassVar[str]
    _writes: ClassVar[ModuleType]

    def __init_subclass__(cls, *, errors: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
                          **kwargs: Any) -> None:  # fmt: skip
        """`errors`: the backend's translate_errors(...); wraps every shared method the class does not override."""
        super().__init_subclass__(**kwargs)
        if errors is None:
            return
        for name, fn in SqlStore.__dict__.items():
            if getattr(fn, "__kfresh_shared__", False) and name not in cls.__dict__:
                setattr(cls, name, errors(fn))

    # -- dialect and connections (the backend's) ---------------------------------------------------
    @abc.abstractmethod
    def _txn(self, *, serialised: bool = True) -> AbstractContextManager[Any]:
        """One write transaction, COMMIT (durable) on success, ROLLBACK on error; yields what executes SQL.
        `serialised` False: the write touches no document, version or change (needs no cross-writer lock)."""

    @abc.abstractmethod
    def _fetchall(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """All rows of one read on a reader connection."""

    def _fetch_in(self, query: str, keys: Sequence[Any], *, batch: int = 500) -> list[tuple[Any, ...]]:
        """The rows of `query` for distinct `keys`, `batch` at a time: the query's `{marks}` becomes one
        placeholder per key of the batch (`... IN ({marks})`)."""
        keys = list(dict.fromkeys(keys))
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(keys), batch):
            part = keys[start : start + batch]
            rows += self._fetchall(query.format(marks=",".join([self._p] * len(part))), part)
        return rows

    # -- writes (their SQL: the backend's `_writes` module) ----------------------------------------
    @_shared
    def write_many(self, ops: Sequence[WriteOp], *, now: float | None = None) -> list[Ack]:
        if not ops:
            return []
        writes = self._writes
        acks: list[Ack] = []
        with self._txn() as w:
            for op in ops:
                if op.owner and not self._owned(w, op.doc_id, op.owner):
                    acks.append(Ack(op.doc_id, 0, "forbidden", 0, 0, time.time()))
                    break  # the ops after it are not applied (the stream ends at it)
                acks.append(writes.upsert(w, op.doc, op.chunks, now) if op.doc is not None
                            else writes.delete(w, op.doc_id, now))  # fmt: skip
        return acks

    def _owned(self, w: Any, doc_id: str, owner: Mapping[str, str]) -> bool:
        """Whether `owner` may write `doc_id`: no live document holds it, or the live one carries the binding."""
        row = w.execute(f"SELECT deleted, metadata FROM documents WHERE doc_id={self._p}", (doc_id,)).fetchone()
        if row is None or row[0]:
            return True
        metadata = json.loads(row[1])
        return all(metadata.get(k) == v for k, v in owner.items())

    @_shared
    def record_citations(self, pairs: Sequence[tuple[str, int]], *, now: float | None = None) -> int:
        if not pairs:
            return 0
        at = time.time() if now is None else now
        p = self._p
        with self._txn(serialised=False) as w:  # touches no document, version or change
            w.executemany(
                f"INSERT INTO citations(doc_id, version, at) VALUES({p},{p},{p})", [(d, int(v), at) for d, v in pairs]
            )
        return len(pairs)

    @_shared
    def record_answer(self, answer: LoggedAnswerRow, shown: Sequence[tuple[str, int]],
                      superseded: Sequence[tuple[str, int]] = ()) -> None:  # fmt: skip
        p = self._p
        with self._txn(serialised=False) as w:  # touches no document, version or change
            w.execute(
                f"INSERT INTO answers(answer_id, at, question, replay_of, body) VALUES({p},{p},{p},{p},{p})",
                (answer.answer_id, answer.at, answer.question, answer.replay_of,
                 json.dumps(answer.body, ensure_ascii=False)),
            )  # fmt: skip
            rows = [(answer.answer_id, d, int(v), True) for d, v in shown]
            rows += [(answer.answer_id, d, int(v), False) for d, v in superseded]
            if rows:
                w.executemany(
                    f"INSERT INTO answer_passages(answer_id, doc_id, version, shown) VALUES({p},{p},{p},{p})", rows
                )

    @_shared
    def logged_questions(self, versions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], list[str]]:
        wanted = set(versions)
        query = (
            "SELECT p.doc_id, p.version, a.question FROM answer_passages p JOIN answers a ON a.answer_id=p.answer_id"
            " WHERE p.shown AND a.replay_of='' AND p.doc_id IN ({marks}) ORDER BY a.at"
        )
        out: dict[tuple[str, int], list[str]] = {}
        for doc_id, version, question in self._fetch_in(query, [d for d, _ in wanted]):
            key = (doc_id, int(version))
            if key in wanted and question not in out.setdefault(key, []):
                out[key].append(question)
        return out

    @_shared
    def erase(self, doc_id: str) -> Erased | None:
        p = self._p
        with self._txn() as w:
            row = w.execute(f"SELECT deleted FROM documents WHERE doc_id={p}", (doc_id,)).fetchone()
            if row is None:
                return None
            if not row[0]:
                raise InvalidInput(f"document {doc_id!r} is live: delete it before erasing it")
            w.execute(
                "UPDATE documents SET text='', metadata='{}', source='', supersedes='[]', content_hash=''"
                f" WHERE doc_id={p}",
                (doc_id,),
            )
            n = {table: max(int(w.execute(f"DELETE FROM {table} WHERE doc_id={p}", (doc_id,)).rowcount or 0), 0)
                 for table in ("versions", "history", "chunks", "history_chunks", "citations")}  # fmt: skip
            shown = f"SELECT answer_id FROM answer_passages WHERE doc_id={p}"
            answers = w.execute(f"DELETE FROM answers WHERE answer_id IN ({shown})", (doc_id,)).rowcount
            w.execute(f"DELETE FROM answer_passages WHERE answer_id IN ({shown})", (doc_id,))
            w.execute(f"INSERT INTO erasures(doc_id, at) VALUES({p},{p})", (doc_id, time.time()))
        return Erased(n["history"], n["chunks"] + n["history_chunks"], n["citations"], max(int(answers or 0), 0))

    @_shared
    def history_rows(self, *, doc_ids: Sequence[str] | None = None) -> list[HistoryRow]:
        query = "SELECT doc_id, version, valid_from, source, metadata, supersedes, acked_at, ended_at, ended_by FROM history"
        if doc_ids is not None:
            rows = sorted(
                self._fetch_in(query + " WHERE doc_id IN ({marks})", doc_ids), key=lambda r: (r[0], int(r[1]))
            )
        else:
            rows = self._fetchall(query + " ORDER BY doc_id, version")
        return [
            HistoryRow(r[0], int(r[1]), float(r[2]), r[3], json.loads(r[4]), tuple(json.loads(r[5])), float(r[6]),
                       None if r[7] is None else float(r[7]), r[8])
            for r in rows
        ]  # fmt: skip

    @_shared
    def history_counts(self) -> tuple[int, int]:
        rows = self._fetchall("SELECT (SELECT COUNT(*) FROM history), (SELECT COUNT(*) FROM history_chunks)")
        return int(rows[0][0]), int(rows[0][1])

    @_shared
    def history_mark(self) -> tuple[int, int]:
        rows = self._fetchall(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM changes), (SELECT COALESCE(MAX(seq), 0) FROM erasures)"
        )
        return int(rows[0][0]), int(rows[0][1])

    @_shared
    def erased_since(self, seq: int) -> list[tuple[int, str]]:
        rows = self._fetchall(f"SELECT seq, doc_id FROM erasures WHERE seq>{self._p} ORDER BY seq", (seq,))
        return [(int(r[0]), r[1]) for r in rows]

    @_shared
    def chunk_texts(self, chunk_ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for table in ("chunks", "history_chunks"):
            for chunk_id, text in self._fetch_in(f"SELECT chunk_id, text FROM {table} WHERE chunk_id IN ({{marks}})",
                                                 list(chunk_ids)):  # fmt: skip
                out[int(chunk_id)] = text
        return out

    @_shared
    def slice_chunks(self, versions: Sequence[HistoryRow]) -> list[tuple[HistoryRow, ChunkRow]]:
        wanted = {(r.doc_id, r.version): r for r in versions}
        rows: list[tuple[Any, ...]] = []
        for table in ("chunks", "history_chunks"):
            query = "SELECT doc_id, version, chunk_id, ordinal, text, embedding FROM " + table
            rows += self._fetch_in(query + " WHERE doc_id IN ({marks})", [d for d, _ in wanted])
        out: dict[int, tuple[HistoryRow, ChunkRow]] = {}
        for doc_id, version, chunk_id, ordinal, text, embedding in rows:
            row = wanted.get((doc_id, int(version)))
            if row is not None:
                out[int(chunk_id)] = (row, ChunkRow(int(chunk_id), int(ordinal), text, vec_from_blob(embedding)))
        return sorted(out.values(), key=lambda rc: (rc[0].doc_id, rc[0].version, rc[1].ordinal))

    @_shared
    def logged_answer(self, answer_id: str) -> LoggedAnswerRow | None:
        rows = self._fetchall(
            f"SELECT answer_id, at, question, replay_of, body FROM answers WHERE answer_id={self._p}", (answer_id,)
        )
        if not rows:
            return None
        r = rows[0]
        return LoggedAnswerRow(r[0], float(r[1]), r[2], json.loads(r[4]), r[3])

    @_shared
    def prune_answers(self, before: float) -> int:
        p = self._p
        with self._txn(serialised=False) as w:
            w.execute(
                f"DELETE FROM answer_passages WHERE answer_id IN (SELECT answer_id FROM answers WHERE at<{p})",
                (before,),
            )
            n = w.execute(f"DELETE FROM answers WHERE at<{p}", (before,)).rowcount
        return int(n or 0)

    @_shared
    def save_applied(self, applied: Sequence[Applied]) -> None:
        if applied:
            with self._txn() as w:
                self._writes.save_applied(w, applied)

    @_shared
    def cleanup_stale(self) -> int:
        with self._txn() as w:
            backfilled = self._writes.backfill_history(w)
            n = self._writes.cleanup_stale(w)
        if backfilled:
            log.info("store.history_backfilled versions=%d (a store from before history was kept)", backfilled)
        if n:
            log.info("store.cleanup stale_chunks=%d", n)
        return n

    @_shared
    def ensure_embedder(self, name: str, dim: int) -> bool:
        ident = f"{name}|{dim}"
        with self._txn() as w:
            was = self._writes.ensure_embedder(w, ident)
        if was is not None:
            log.warning("store.embedder_changed was=%s now=%s: stored vectors dropped, re-embedding", was, ident)
        return was is not None

    # -- reads -------------------------------------------------------------------------------------
    @_shared
    def citation_counts(self, *, since: float = 0.0) -> dict[tuple[str, int], int]:
        rows = self._fetchall(
            f"SELECT doc_id, version, COUNT(*) FROM citations WHERE at>={self._p} GROUP BY doc_id, version", (since,)
        )
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    @_shared
    def current(self, doc_id: str) -> DocState | None:
        rows = self._fetchall(
            "SELECT d.version, d.deleted, d.acked_at, d.indexed_at,"
            f" (SELECT COALESCE(MAX(seq), 0) FROM changes c WHERE c.doc_id=d.doc_id) FROM documents d WHERE d.doc_id={self._p}",
            (doc_id,),
        )
        if not rows:
            return None
        version, deleted, acked_at, indexed_at, seq = rows[0]
        return DocState(doc_id, int(version), bool(deleted), acked_at, indexed_at, int(seq))

    @_shared
    def chunks_for(self, doc_id: str, version: int) -> list[ChunkRow]:
        p = self._p
        rows = self._fetchall(
            f"SELECT chunk_id, ordinal, text, embedding FROM chunks WHERE doc_id={p} AND version={p} ORDER BY ordinal",
            (doc_id, version),
        )
        return [ChunkRow(int(r[0]), int(r[1]), r[2], vec_from_blob(r[3])) for r in rows]

    @_shared
    def attrs_of(self, versions: Sequence[tuple[str, int]]) -> dict[str, DocAttrs]:
        wanted = dict(versions)
        query = "SELECT doc_id, version, metadata, source, valid_from FROM versions WHERE doc_id IN ({marks})"
        return {
            doc_id: DocAttrs(json.loads(metadata), source, float(valid_from))
            for doc_id, version, metadata, source, valid_from in self._fetch_in(query, list(wanted))
            if wanted[doc_id] == int(version)
        }

    @_shared
    def live_metadata(self, doc_ids: Sequence[str], *, deleted_too: bool = False) -> dict[str, dict[str, str]]:
        live = "" if deleted_too else "NOT deleted AND "
        query = "SELECT doc_id, metadata FROM documents WHERE " + live + "doc_id IN ({marks})"
        return {doc_id: json.loads(metadata) for doc_id, metadata in self._fetch_in(query, doc_ids)}

    @_shared
    def docs_changed_since(self, seq: int) -> list[str]:
        return [
            r[0]
            for r in self._fetchall(
                f"SELECT doc_id FROM changes WHERE seq>{self._p} GROUP BY doc_id ORDER BY MAX(seq)", (seq,)
            )
        ]

    @_shared
    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]:
        rows = self._fetchall(f"SELECT seq, doc_id, version, op FROM changes WHERE seq>{self._p} ORDER BY seq", (seq,))
        return [(int(r[0]), r[1], int(r[2]), r[3]) for r in rows]

    @_shared
    def current_changes(self, after_seq: int, upto_seq: int, limit: int) -> list[ChangeRow]:
        rows = self._fetchall(
            "SELECT c.seq, c.doc_id, c.version, c.op, d.acked_at, d.indexed_at, d.lag_ms, d.metadata, d.source,"
            " d.valid_from FROM changes c JOIN documents d ON d.doc_id=c.doc_id AND d.version=c.version"
            f" WHERE c.seq>{self._p} AND c.seq<={self._p} ORDER BY c.seq LIMIT {self._p}",
            (after_seq, upto_seq, limit),
        )
        return [
            ChangeRow(int(r[0]), r[1], int(r[2]), r[3], r[4], r[5], r[6], DocAttrs(json.loads(r[7]), r[8], float(r[9])))
            for r in rows
        ]

    @_shared
    def unembedded(self) -> list[tuple[DocState, int]]:
        rows = self._fetchall(
            "SELECT d.doc_id, d.version, d.acked_at, d.indexed_at, COUNT(c.chunk_id),"
            " (SELECT COALESCE(MAX(seq), 0) FROM changes x WHERE x.doc_id=d.doc_id)"
            " FROM documents d JOIN chunks c ON c.doc_id=d.doc_id AND c.version=d.version"
            " WHERE NOT d.deleted AND c.embedding IS NULL GROUP BY d.doc_id ORDER BY 6"
        )
        return [(DocState(r[0], int(r[1]), False, r[2], r[3], int(r[5])), int(r[4])) for r in rows]

    @_shared
    def max_seq(self) -> int:
        return int(self._fetchall("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    @_shared
    def counts(self) -> tuple[int, int, int]:
        live, deleted, chunks = self._fetchall(
            "SELECT COUNT(*) FILTER (WHERE NOT deleted), COUNT(*) FILTER (WHERE deleted),"
            " (SELECT COUNT(*) FROM chunks c JOIN documents d ON d.doc_id=c.doc_id AND d.version=c.version"
            " AND NOT d.deleted) FROM documents"
        )[0]
        return int(live), int(chunks), int(deleted)

    # -- the finetuner's read-only view ------------------------------------------------------------
    @_shared
    def documents(self) -> list[DocRecord]:
        rows = self._fetchall(
            "SELECT doc_id, version, source, valid_from, acked_at, supersedes, text, deleted FROM documents"
            " ORDER BY valid_from, doc_id"
        )
        return [doc_record(r) for r in rows]

    @_shared
    def supersedes_of(self, doc_ids: Sequence[str]) -> dict[str, list[str]]:
        query = (
            "SELECT doc_id, supersedes FROM documents WHERE NOT deleted AND supersedes <> '[]' AND doc_id IN ({marks})"
        )
        return {doc_id: list(json.loads(supersedes)) for doc_id, supersedes in self._fetch_in(query, doc_ids)}

    @_shared
    def cited_versions(self) -> set[tuple[str, int]]:
        return {(r[0], int(r[1])) for r in self._fetchall("SELECT DISTINCT doc_id, version FROM citations")}
