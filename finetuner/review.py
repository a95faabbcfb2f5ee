"""The review queue (the annotation step): with `finetune.require_review`, what a run would learn waits here and
only approved items train.

An item is one fact of a document version: a question pair from any text or a template fact. Distillation runs
(dry runs too) offer their new candidates; offering the same fact again changes nothing. People decide with
`kfresh review approve|reject` or the `DecideReview` admin RPC; every decision is kept with who made it, when,
and a note, and a later decision overrides an earlier one (both stay in the history). The queue lists what helps
most first: items the base model answers wrong closed-book, then documents cited most often by answers, then
the oldest. One SQLite file (`finetune.work_dir/review.sqlite`, WAL) shared by the server and the distillation
worker process.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kfresh.core.errors import InvalidInput, NotFound
from kfresh.finetuner.facts import Fact

State = Literal["pending", "approved", "rejected"]
STATES: tuple[State, ...] = ("pending", "approved", "rejected")
QUEUE_FILE = "review.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    fact TEXT NOT NULL,
    state TEXT NOT NULL CHECK(state IN ('pending', 'approved', 'rejected')),
    base_wrong INTEGER NOT NULL,
    cited INTEGER NOT NULL,
    added_at REAL NOT NULL,
    decided_by TEXT NOT NULL DEFAULT '',
    decided_at REAL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS decisions(
    seq INTEGER PRIMARY KEY,
    item INTEGER NOT NULL REFERENCES items(id),
    state TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    decided_at REAL NOT NULL,
    note TEXT NOT NULL
);
"""
_ORDER = "ORDER BY state <> 'pending', base_wrong DESC, cited DESC, added_at, id"
_COLUMNS = "id, fact, state, base_wrong, cited, added_at, decided_by, decided_at, note"


@dataclass(frozen=True)
class ReviewItem:
    id: int
    fact: Fact
    state: State
    base_wrong: bool  # the base model answered it wrong closed-book when it was offered
    cited: int  # answers that cited the document version, when it was offered
    added_at: float
    decided_by: str = ""
    decided_at: float | None = None
    note: str = ""


def item_key(fact: Fact) -> str:
    return hashlib.sha256(json.dumps(fact.to_dict(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ReviewQueue:
    """Offer, list, decide; `approved` filters a run's candidates. Safe for threads; other processes share the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def erase_document(self, doc_id: str) -> int:
        """Erase every item (and its decisions) drawn from `doc_id`, any version: a purge. Returns the items."""
        with self._lock:
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM decisions WHERE item IN (SELECT id FROM items WHERE doc_id=?)", (doc_id,))
                n = self._db.execute("DELETE FROM items WHERE doc_id=?", (doc_id,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def __enter__(self) -> ReviewQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def offer(
        self, facts: Sequence[Fact], *, base_wrong: Iterable[str] = (), cited: dict[tuple[str, int], int] | None = None
    ) -> int:
        """Queue the facts not queued before (pending); returns how many were new. `base_wrong`: keys of the facts
        the served model answers wrong closed-book."""
        wrong, counts, now = set(base_wrong), cited or {}, time.time()
        keyed = [(item_key(f), f) for f in facts]
        rows = [(key, f.doc_id, f.version, json.dumps(f.to_dict(), ensure_ascii=False), int(key in wrong),
                 counts.get((f.doc_id, f.version), 0), now) for key, f in keyed]  # fmt: skip
        with self._lock:
            before = self._count()
            self._db.executemany(
                "INSERT OR IGNORE INTO items(key, doc_id, version, fact, state, base_wrong, cited, added_at)"
                " VALUES(?, ?, ?, ?, 'pending', ?, ?, ?)",
                rows,
            )
            return self._count() - before

    def unqueued(self, facts: Sequence[Fact]) -> list[Fact]:
        """The facts never offered before."""
        with self._lock:
            keys = {r[0] for r in self._db.execute("SELECT key FROM items").fetchall()}
        return [f for f in facts if item_key(f) not in keys]

    def approved(self, facts: Sequence[Fact]) -> list[Fact]:
        """The facts among `facts` whose item was approved (a fact never offered is not approved)."""
        keys = {item_key(f): f for f in facts}
        with self._lock:
            rows = self._db.execute("SELECT key FROM items WHERE state = 'approved'").fetchall()
        ok = {r[0] for r in rows}
        return [f for k, f in keys.items() if k in ok]

    def items(self, *, state: str = "", limit: int = 0) -> list[ReviewItem]:
        """Items in review order (pending first; then wrong closed-book, most cited, oldest)."""
        if state and state not in STATES:
            raise InvalidInput(f"review state must be one of {', '.join(STATES)} (or empty for all); got {state!r}")
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        query = f"SELECT {_COLUMNS} FROM items {where} {_ORDER}" + (" LIMIT ?" if limit > 0 else "")
        with self._lock:
            rows = self._db.execute(query, [*args, *([limit] if limit > 0 else [])]).fetchall()
        return [_item(r) for r in rows]

    def get(self, item_id: int) -> ReviewItem:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise NotFound(f"review item {item_id} does not exist (kfresh review list shows the queue)")
        return _item(row)

    def decide(self, ids: Sequence[int], state: State, *, by: str, note: str = "") -> list[ReviewItem]:
        """Approve or reject items (all or none: an unknown id changes nothing); every decision is recorded."""
        if state not in ("approved", "rejected"):
            raise InvalidInput(f"a decision approves or rejects; got {state!r}")
        if not ids:
            raise InvalidInput("no review item ids given")
        if not by.strip():
            raise InvalidInput("a decision needs a reviewer name")
        now = time.time()
        with self._lock:
            known = {r[0] for r in self._db.execute(
                f"SELECT id FROM items WHERE id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()}  # fmt: skip
            missing = sorted(set(ids) - known)
            if missing:
                raise NotFound(f"review items {missing} do not exist (kfresh review list shows the queue)")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for item_id in ids:
                    self._db.execute("UPDATE items SET state=?, decided_by=?, decided_at=?, note=? WHERE id=?",
                                     (state, by, now, note, item_id))  # fmt: skip
                    self._db.execute("INSERT INTO decisions(item, state, decided_by, decided_at, note) VALUES(?,?,?,?,?)",
                                     (item_id, state, by, now, note))  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [self.get(i) for i in ids]

    def history(self, item_id: int) -> list[tuple[str, str, float, str]]:
        """(state, decided_by, decided_at, note) of every decision on the item, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, decided_by, decided_at, note FROM decisions WHERE item = ? ORDER BY seq", (item_id,)
            ).fetchall()
        return [(str(r[0]), str(r[1]), float(r[2]), str(r[3])) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {str(r[0]): int(r[1]) for r in rows}

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def _item(row: Sequence[Any]) -> ReviewItem:
    item_id, fact, state, wrong, cited, added, by, at, note = row
    return ReviewItem(
        id=int(item_id), fact=Fact.from_dict(json.loads(str(fact))), state=state, base_wrong=bool(wrong),
        cited=int(cited), added_at=float(added), decided_by=str(by), decided_at=float(at) if at is not None else None,
        note=str(note),
    )  # fmt: skip
