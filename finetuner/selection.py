"""Which documents are validated enough to be learned into weights.

Retrieval can follow a document the second it is acknowledged; weights cannot be corrected that fast, so
the finetuner only learns documents that are current (not deleted, not superseded), from a trusted source,
unchanged for `stable_for_s`, and optionally ones that answers actually cited. The store (SQLite or
PostgreSQL) is opened READ-ONLY from this process: the finetuner must never be able to change what the
server serves.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field

from kfresh.core.config import FinetuneConfig, StoreConfig
from kfresh.indexer.stores import open_store

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


def select_documents(cfg: FinetuneConfig, store_cfg: StoreConfig, *, now: float | None = None) -> Selection:
    """Current, trusted, stable, not superseded (and, if required, cited) documents, oldest first.

    FileNotFoundError when no server has created the store yet.
    """
    now = time.time() if now is None else now
    with open_store(store_cfg, read_only=True) as store:
        rows = store.documents()
        cited = store.cited_versions() if cfg.require_cited else None
    live = [r for r in rows if not r.deleted]
    superseded_by = {old: r.doc_id for r in live for old in r.supersedes}
    out = Selection(deleted={r.doc_id for r in rows if r.deleted})
    for r in live:
        reason = _reason(cfg, r.doc_id, r.version, r.source, r.acked_at, now, superseded_by, cited)
        if reason:
            out.skipped[r.doc_id] = reason
        else:
            out.docs.append(SelectedDoc(r.doc_id, r.version, r.source, r.valid_from, r.text))
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
