"""Which documents are validated enough to be learned into weights.

Retrieval can follow a document the second it is acknowledged; weights cannot be corrected that fast, so
the finetuner only learns documents that are current (not deleted, not superseded), from a trusted source,
unchanged for `stable_for_s`, and optionally ones that answers actually cited. The store is opened
READ-ONLY from this process: the finetuner must never be able to change what the server serves.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from kfresh.config import FinetuneConfig

log = logging.getLogger("kfresh.finetuner")


@dataclass(frozen=True)
class SelectedDoc:
    doc_id: str
    version: int
    source: str
    valid_from: float
    text: str


@dataclass
class Selection:
    """Documents to learn, and why every other current document was left out (doc_id -> reason)."""

    docs: list[SelectedDoc] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (SQLite's mode=ro), with a busy timeout for the server's WAL commits."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"document store {path} does not exist; ingest documents first")
    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"  # quoted: a path may hold '?', '#' or spaces
    conn = sqlite3.connect(uri, uri=True, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def select_documents(cfg: FinetuneConfig, db_path: Path, *, now: float | None = None) -> Selection:
    """Current, trusted, stable, not superseded (and, if required, cited) documents, oldest first."""
    now = time.time() if now is None else now
    conn = connect_read_only(db_path)
    try:
        rows = conn.execute(
            "SELECT doc_id, version, source, valid_from, acked_at, supersedes, text, deleted FROM documents"
            " ORDER BY valid_from, doc_id"
        ).fetchall()
        cited = _cited(conn) if cfg.require_cited else None
    finally:
        conn.close()
    live = [r for r in rows if not r[7]]
    superseded_by = {old: r[0] for r in live for old in json.loads(r[5] or "[]")}
    out = Selection(deleted={r[0] for r in rows if r[7]})
    for doc_id, version, source, valid_from, acked_at, _sup, text, _deleted in live:
        reason = _reason(cfg, doc_id, version, source, acked_at, now, superseded_by, cited)
        if reason:
            out.skipped[doc_id] = reason
        else:
            out.docs.append(SelectedDoc(doc_id, int(version), source, float(valid_from), text))
    log.info("selection docs=%d skipped=%d deleted=%d", len(out.docs), len(out.skipped), len(out.deleted))
    return out


def _reason(
    cfg: FinetuneConfig,
    doc_id: str,
    version: int,
    source: str,
    acked_at: float,
    now: float,
    superseded_by: dict[str, str],
    cited: set[tuple[str, int]] | None,
) -> str | None:
    if doc_id in superseded_by:
        return f"superseded by {superseded_by[doc_id]}"
    if not any(fnmatch.fnmatchcase(source, pattern) for pattern in cfg.trusted_sources):
        return f"untrusted source {source!r}"
    if now - acked_at < cfg.stable_for_s:
        return f"changed {now - acked_at:.0f} s ago (< stable_for_s {cfg.stable_for_s:.0f})"
    if cited is not None and (doc_id, int(version)) not in cited:
        return "never cited by an answer"
    return None


def _cited(conn: sqlite3.Connection) -> set[tuple[str, int]]:
    """(doc_id, version) pairs answers have cited; a store without the citations table has none."""
    try:
        rows = conn.execute("SELECT DISTINCT doc_id, version FROM citations").fetchall()
    except sqlite3.OperationalError:
        return set()
    return {(r[0], int(r[1])) for r in rows}
