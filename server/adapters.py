"""Which LoRA adapter the server answers with: the registry's CURRENT version, hot-swapped live.

`AdapterManager` keeps the served version and its rollback target loaded in the generation backend,
so a swap or a rollback is a pointer change. Weights are loaded only through
`AdapterRegistry.verified_dir` (sha256 must match the manifest); a mismatch is refused and logged and
serving continues on what was loaded before. Each answer holds a lease on the adapter it started with,
and an adapter is unloaded only once no lease holds it, so in-flight requests never fail on a swap.
A watcher polls CURRENT.json so a version published by another process is picked up without a restart.
Every method runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfresh.core import metrics
from kfresh.core.errors import InvalidInput, KfreshError
from kfresh.finetuner.registry import AdapterManifest, AdapterRegistry
from kfresh.server.generation.base import GenerationBackend

log = logging.getLogger("kfresh.adapters")

VERSION_RE = re.compile(r"^v\d{1,9}$")
BASE = "none"


@dataclass(frozen=True)
class AdapterChoice:
    """What one request generates with: `version` "" and `served_name` None mean the base model."""

    version: str
    served_name: str | None


BASE_MODEL = AdapterChoice("", None)


@dataclass(frozen=True)
class AdapterStatus:
    manifest: AdapterManifest
    current: bool
    loaded: bool
    standby: bool
    withdrawn: str = ""  # why it will never be served again ('' = it may be)


@dataclass(frozen=True)
class AdapterChange:
    """Result of promote/rollback: what is served now, what was before, how long the switch itself took."""

    current: str
    previous: str
    swap_ms: float


def parse_version(requested: str) -> str:
    """'v0003' or its served name 'kfresh-v0003' -> 'v0003'; anything else is InvalidInput."""
    version = requested.strip().removeprefix("kfresh-")
    if not VERSION_RE.match(version):
        raise InvalidInput(f"adapter must be '', 'none' or a version like 'v0003'; got {requested!r}")
    return version


def read_only_statuses(root: Path) -> tuple[list[AdapterStatus], str]:
    """The registry's versions and CURRENT version without loading anything (servers with LoRA off)."""
    if not (root / "CURRENT.json").is_file() and not any(root.glob("v[0-9]*")):
        return [], ""
    registry = AdapterRegistry(root)
    current = registry.pointer().get("version") or ""
    withdrawn = registry.withdrawn()
    statuses = [
        AdapterStatus(m, m.version == current, False, False, withdrawn.get(m.version, {}).get("reason", ""))
        for m in registry.list()
    ]
    return statuses, current


class AdapterManager:
    """Loads registry versions into a backend under `manifest.served_name` and picks one per request."""

    def __init__(self, registry: AdapterRegistry, backend: GenerationBackend, *, poll_interval_s: float = 1.0) -> None:
        self._registry = registry
        self._backend = backend
        self._poll_s = poll_interval_s
        self._lock = asyncio.Lock()  # serialises loads, unloads and swaps; never held by a request
        self._loaded: dict[str, str] = {}  # version -> served name in the backend
        self._leases: Counter[str] = Counter()
        self._current: str | None = None
        self._standby: str | None = None  # the rollback target, kept loaded
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stamp: tuple[int, int, int] | None = None

    @property
    def registry(self) -> AdapterRegistry:
        return self._registry

    # -- what requests see ------------------------------------------------------------------------
    @property
    def current_version(self) -> str:
        """The version new requests get by default; "" = the base model."""
        return self._current or ""

    @property
    def standby_version(self) -> str:
        return self._standby or ""

    @property
    def loaded_versions(self) -> list[str]:
        return sorted(self._loaded)

    async def resolve(self, requested: str) -> str | None:
        """'' -> the current version's served name (None without one), 'none' -> None, 'v0003' -> it (loaded on demand)."""
        return (await self._choose(requested)).served_name

    @contextlib.asynccontextmanager
    async def use(self, requested: str) -> AsyncIterator[AdapterChoice]:
        """Resolve and hold the adapter for one request; it stays loaded until the request ends."""
        choice = await self._choose(requested, lease=True)
        try:
            yield choice
        finally:
            if choice.version:
                self._release(choice.version)

    async def _choose(self, requested: str, *, lease: bool = False) -> AdapterChoice:
        if requested.strip().lower() == BASE:
            return BASE_MODEL
        if not requested.strip():
            # No await between reading the pointer and taking the lease: a swap cannot slip in between.
            version = self._current
        else:
            version = parse_version(requested)
            if version not in self._loaded:
                async with self._lock:
                    await self._load(version)
        if version is None:
            return BASE_MODEL
        if lease:
            self._leases[version] += 1
        return AdapterChoice(version, self._loaded[version])

    def _release(self, version: str) -> None:
        self._leases[version] -= 1
        if self._leases[version] <= 0:
            del self._leases[version]
            if version in self._loaded and version not in self._wanted():
                self._spawn(self._reconcile())

    # -- registry -> backend ----------------------------------------------------------------------
    async def sync(self) -> str:
        """Serve what CURRENT.json names; a version that fails verification is refused, serving goes on."""
        async with self._lock:
            self._stamp = self._pointer_stamp()  # before the read: a later write is seen by the watcher
            pointer = await asyncio.to_thread(self._registry.pointer)
            await self._apply(pointer, strict=False)
        return self.current_version

    async def promote(self, version: str) -> AdapterChange:
        """Load and verify `version`, point the registry at it, then switch new requests to it."""
        version = parse_version(version)
        async with self._lock:
            await self._load(version)
            await asyncio.to_thread(self._registry.promote, version)
            return await self._apply(await asyncio.to_thread(self._registry.pointer), strict=True)

    async def rollback(self) -> AdapterChange:
        """Serve the previously served version again (the base model when there is none); instant when preloaded."""
        async with self._lock:
            pointer = await asyncio.to_thread(self._registry.pointer)
            if not pointer.get("version"):
                raise InvalidInput("no adapter is being served: nothing to roll back")
            previous = list(pointer.get("previous") or [])
            if previous:
                await self._load(previous[-1])
            await asyncio.to_thread(self._registry.rollback)
            return await self._apply(await asyncio.to_thread(self._registry.pointer), strict=True)

    async def _apply(self, pointer: dict[str, Any], *, strict: bool) -> AdapterChange:
        """Switch to the pointer's version (loading it first), then load the rollback target in the background."""
        target = pointer.get("version")
        before = self.current_version
        if target and target not in self._loaded:
            try:
                await self._load(target)
            except KfreshError as exc:
                if strict:
                    raise
                log.error("adapter_refused version=%s serving=%s reason=%s", target, before or "base", exc)
                return AdapterChange(before, before, 0.0)
        start = time.perf_counter()
        self._current = target or None
        previous = list(pointer.get("previous") or [])
        self._standby = previous[-1] if previous and previous[-1] != target else None
        swap_ms = (time.perf_counter() - start) * 1000
        metrics.set_adapter(self.current_version)
        if self.current_version != before:
            log.info("adapter_served version=%s previous=%s", self.current_version or "base", before or "base")
        self._spawn(self._prepare_standby())
        await self._reconcile_locked()
        return AdapterChange(self.current_version, before, swap_ms)

    async def _prepare_standby(self) -> None:
        async with self._lock:
            standby = self._standby
            if standby and standby not in self._loaded:
                try:
                    await self._load(standby)
                except KfreshError as exc:
                    log.warning(
                        "adapter_standby_failed version=%s reason=%s (rollback will load it then)", standby, exc
                    )

    async def _load(self, version: str, *, again: bool = False) -> None:
        """Verify (sha256) and load `version` into the backend; caller holds the lock. `again` loads it (in place)
        even though this manager loaded it already."""
        if version in self._loaded and not again:
            return
        manifest = await asyncio.to_thread(self._registry.get, version)
        start = time.perf_counter()
        path = await asyncio.to_thread(self._registry.verified_dir, version)
        await self._backend.load_adapter(manifest.served_name, str(path))
        self._loaded[version] = manifest.served_name
        log.info(
            "adapter_loaded version=%s name=%s ms=%.1f",
            version,
            manifest.served_name,
            (time.perf_counter() - start) * 1000,
        )

    async def reload(self, version: str) -> None:
        """Load `version` into the backend again (in place) although this manager loaded it already: a
        generation server shared with other replicas may have dropped it."""
        async with self._lock:
            # Stays in _loaded while it loads and if that fails: requests for it keep resolving (and retrying).
            await self._load(version, again=True)

    def _wanted(self) -> set[str]:
        return {v for v in (self._current, self._standby) if v}

    async def _reconcile(self) -> None:
        async with self._lock:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        """Unload versions that are neither served nor the rollback target and that no request holds."""
        while True:
            # Re-checked after every await: a request may have leased a version meanwhile.
            idle = [v for v in self._loaded if v not in self._wanted() and not self._leases[v]]
            if not idle:
                return
            version = idle[0]
            name = self._loaded.pop(version)  # before the await: a new request now loads it afresh
            try:
                await self._backend.unload_adapter(name)
                log.info("adapter_unloaded version=%s", version)
            except KfreshError as exc:
                log.warning("adapter_unload_failed version=%s reason=%s", version, exc)

    # -- listing ----------------------------------------------------------------------------------
    async def list_adapters(self) -> list[AdapterStatus]:
        manifests = await asyncio.to_thread(self._registry.list)
        withdrawn = await asyncio.to_thread(self._registry.withdrawn)
        return [
            AdapterStatus(m, m.version == self._current, m.version in self._loaded, m.version == self._standby,
                          withdrawn.get(m.version, {}).get("reason", ""))
            for m in manifests
        ]  # fmt: skip

    # -- the watcher ------------------------------------------------------------------------------
    def start_watcher(self) -> None:
        """Poll CURRENT.json (mtime, size, inode) and sync when it changes."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="adapter-watcher")

    def _pointer_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._registry.root / "CURRENT.json")
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            if self._pointer_stamp() == self._stamp:
                continue
            try:
                await self.sync()
            except Exception:
                log.exception("adapter_sync_failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, *, unload: bool = True) -> None:
        """Stop the watcher; with `unload`, remove this manager's adapters (a backend shared with others)."""
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = None
        if unload and self._backend.ready:
            async with self._lock:
                self._current = self._standby = None
                self._leases.clear()
                await self._reconcile_locked()
