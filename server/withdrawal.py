"""Deletes go through the weights: an adapter that learned a document stops being served once the document is
deleted, updated (a new version) or superseded.

The watch follows the store's change log (every acknowledged write, by any writer of a shared store: this server,
another replica, the NATS consumer) every `generation.adapter_poll_s`. A change to a document that a registry
version learned (its facts.jsonl names the document and the version learned) withdraws that version in the
registry for good (`AdapterRegistry.withdraw`): it leaves the rollback history, and when it is the served one the
newest earlier version that is still allowed is served instead, or the base model. The server then serves what the
registry names (`AdapterManager.sync`) and the distillation scheduler is asked to rebuild without the document.
At start, the learned versions are checked against the store once, so a delete made while the server was down
withdraws too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from kfresh.core import metrics
from kfresh.finetuner.registry import AdapterRegistry
from kfresh.indexer.rows import DocState

log = logging.getLogger("kfresh.adapters")


class ChangeLog(Protocol):
    """What the watch reads from the index (the Indexer)."""

    def changes_since(self, seq: int) -> list[tuple[int, str, int, str]]: ...

    def last_change(self) -> int: ...

    def document_state(self, doc_id: str) -> DocState | None: ...

    def supersedes_of(self, doc_ids: Sequence[str]) -> dict[str, list[str]]: ...


def stale_versions(
    learned: dict[str, dict[str, int]], changes: Sequence[tuple[int, str, int, str]], superseded: dict[str, list[str]]
) -> dict[str, str]:
    """version -> why it must go, for each version whose learned document changed or was superseded. Pure."""
    last: dict[str, tuple[int, str]] = {}
    for _, doc_id, version, op in changes:
        last[doc_id] = (version, op)
    replaced_by = {old: new for new, olds in superseded.items() for old in olds}
    out: dict[str, str] = {}
    for adapter, docs in learned.items():
        for doc_id, version in docs.items():
            if doc_id in last and last[doc_id] != (version, "upsert"):
                changed, op = last[doc_id]
                what = "deleted" if op == "delete" else f"updated to version {changed}"
                out[adapter] = f"learned document {doc_id!r} version {version}, since {what}"
                break
            if doc_id in replaced_by:
                out[adapter] = f"learned document {doc_id!r}, since superseded by {replaced_by[doc_id]!r}"
                break
    return out


def stale_at_start(learned: dict[str, dict[str, int]], state: Callable[[str], DocState | None]) -> dict[str, str]:
    """version -> why, for versions whose learned document version is no longer the live one (checked in the store)."""
    seen: dict[str, DocState | None] = {}
    out: dict[str, str] = {}
    for adapter, docs in learned.items():
        for doc_id, version in docs.items():
            if doc_id not in seen:
                seen[doc_id] = state(doc_id)
            now = seen[doc_id]
            if now is not None and (now.deleted or now.version != version):
                what = "deleted" if now.deleted else f"updated to version {now.version}"
                out[adapter] = f"learned document {doc_id!r} version {version}, since {what}"
                break
    return out


class WithdrawalWatch:
    """Follows the change log and withdraws the adapter versions whose documents changed."""

    def __init__(
        self,
        registry: AdapterRegistry,
        changes: ChangeLog,
        *,
        on_withdrawn: Callable[[dict[str, str]], Awaitable[Any]],
        interval_s: float = 1.0,
    ) -> None:
        self._registry = registry
        self._changes = changes
        self._on_withdrawn = on_withdrawn
        self._interval_s = interval_s
        self._seen = 0
        self._learned: dict[str, dict[str, int]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check the store once (deletes made while down), then follow the change log in the background."""
        self._seen = await asyncio.to_thread(self._changes.last_change)
        await asyncio.to_thread(self._refresh_learned)
        stale = await asyncio.to_thread(stale_at_start, self._learned, self._changes.document_state)
        await self._withdraw(stale)
        self._task = asyncio.create_task(self._follow(), name="adapter-withdrawal")

    async def check(self) -> dict[str, str]:
        """One pass over the changes since the last one; returns what it withdrew."""
        changes = await asyncio.to_thread(self._changes.changes_since, self._seen)
        if not changes:
            return {}
        self._seen = changes[-1][0]
        await asyncio.to_thread(self._refresh_learned)
        if not self._learned:
            return {}
        upserted = [doc_id for _, doc_id, _, op in changes if op == "upsert"]
        superseded = await asyncio.to_thread(self._changes.supersedes_of, upserted) if upserted else {}
        stale = stale_versions(self._learned, changes, superseded)
        await self._withdraw(stale)
        return stale

    def _refresh_learned(self) -> None:
        """What every allowed registry version learned (versions are immutable: each is read once)."""
        withdrawn = self._registry.withdrawn()
        versions = [v for v in self._registry.versions() if v not in withdrawn]
        self._learned = {v: self._learned[v] if v in self._learned else self._registry.learned(v) for v in versions}

    async def _withdraw(self, stale: dict[str, str]) -> None:
        if not stale:
            return
        pointer = await asyncio.to_thread(self._registry.withdraw, stale)
        for version, reason in sorted(stale.items()):
            self._learned.pop(version, None)
            metrics.ADAPTERS_WITHDRAWN.inc()
            log.warning("adapter_withdrawn version=%s reason=%s serving=%s", version, reason,
                        pointer.get("version") or "base")  # fmt: skip
        await self._on_withdrawn(stale)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("adapter_withdrawal_check_failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
