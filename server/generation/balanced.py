"""Several vLLM OpenAI-compatible servers behind one kfresh: health-aware, least-loaded routing, and
LoRA adapters that every routable replica holds.

Invariants:
- a replica is routable only while healthy AND holding every adapter kfresh has loaded: a replica that
  comes back (or joins late) gets the adapters first and only then receives traffic;
- `load_adapter` is all-or-nothing over the routable replicas: if one fails, the others unload it again
  and the error propagates, so the adapter manager never routes to a version some replicas lack;
- a request that fails before its first token moves to another replica; after the first token it
  cannot (the client has the start of an answer), and the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kfresh.core.config import GenerationConfig
from kfresh.core.errors import KfreshError, NotFound, Unavailable
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest
from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

log = logging.getLogger(__name__)


@dataclass
class Replica:
    backend: OpenAIRemoteBackend
    url: str
    routable: bool = False
    inflight: int = 0
    adapters: set[str] = field(default_factory=set)
    served: int = 0


class BalancedRemoteBackend(GenerationBackend):
    """One GenerationBackend over N `vllm serve` replicas (generation.remote_url lists them, comma-separated)."""

    def __init__(self, cfg: GenerationConfig, replicas: Sequence[OpenAIRemoteBackend], urls: Sequence[str]) -> None:
        if not replicas:
            raise ValueError("a balanced backend needs at least one replica")
        self._cfg = cfg
        self.replicas = [Replica(b, u) for b, u in zip(replicas, urls)]
        self.name = "remote" if len(self.replicas) == 1 else "remote-balanced"  # what Stats reports
        self._adapters: dict[str, str] = {}  # name -> path: what every routable replica must hold
        self._requests: dict[str, Replica] = {}
        self._lock = asyncio.Lock()  # adapter changes and replica admission
        self._health_task: asyncio.Task[None] | None = None

    @property
    def model(self) -> str:
        return self.replicas[0].backend.model

    @property
    def ready(self) -> bool:
        return any(r.routable for r in self.replicas)

    async def start(self) -> None:
        """Ready once one replica is up (waiting up to remote_timeout_s); the others join when they pass a check."""
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._watch(), name="kfresh-replica-health")
        deadline = time.monotonic() + self._cfg.remote_timeout_s
        while True:
            await self.refresh()
            if self.ready:
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"no vLLM replica became healthy: {', '.join(r.url for r in self.replicas)}")
            await asyncio.sleep(0.5)
        log.info("replicas_ready routable=%d of %d", sum(r.routable for r in self.replicas), len(self.replicas))

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await asyncio.gather(*(r.backend.shutdown() for r in self.replicas), return_exceptions=True)
        for replica in self.replicas:
            self._drop(replica)

    async def check_health(self) -> bool:
        await self.refresh()
        return self.ready

    async def serving(self) -> bool:
        return self.ready  # the health watcher refreshes the replicas every remote_health_interval_s already

    async def refresh(self) -> None:
        """One health round: drop failing replicas, admit recovered ones (after loading the adapters)."""
        checks = await asyncio.gather(*(self._check(r) for r in self.replicas), return_exceptions=True)
        for replica, healthy in zip(self.replicas, checks):
            if healthy is True and not replica.routable:
                await self._admit(replica)
            elif healthy is not True and replica.routable:
                self._drop(replica)
                log.warning("replica_down url=%s", replica.url)

    @staticmethod
    def _drop(replica: Replica) -> None:
        """Out of the rotation. It may come back restarted, without its runtime-loaded adapters, so it is
        admitted again only after reloading every one (in place: harmless when it still holds them)."""
        replica.routable = False
        replica.adapters.clear()

    async def _check(self, replica: Replica) -> bool:
        if not replica.backend.ready:  # never started, or marked failed: (re)start waits briefly for /health
            try:
                await replica.backend.start()
                return True
            except (KfreshError, OSError):
                return False
        return await replica.backend.check_health()

    async def _admit(self, replica: Replica) -> None:
        async with self._lock:
            try:
                for name, path in self._adapters.items():
                    if name not in replica.adapters:
                        await replica.backend.load_adapter(name, path)
                        replica.adapters.add(name)
            except (KfreshError, OSError) as exc:
                log.warning("replica_not_admitted url=%s error=%s", replica.url, exc)
                return
            replica.routable = True
            log.info("replica_up url=%s adapters=%d", replica.url, len(self._adapters))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.remote_health_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("replica_health_round_failed")

    def _pick(self, tried: set[int]) -> Replica:
        candidates = [r for i, r in enumerate(self.replicas) if r.routable and i not in tried]
        if not candidates:
            raise Unavailable("no healthy vLLM replica: every one is down or failed this request")
        return min(candidates, key=lambda r: (r.inflight, r.served))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        tried: set[int] = set()
        while True:
            replica = self._pick(tried)
            tried.add(self.replicas.index(replica))
            started = False
            replica.inflight += 1
            replica.served += 1
            self._requests[request.request_id] = replica
            try:
                async for chunk in replica.backend.generate(request):
                    started = True
                    yield chunk
                return
            except NotFound:
                if request.adapter and not started:  # unloaded behind our back (a replica sharing the server):
                    replica.adapters.discard(request.adapter)  # the next load_adapter puts it back there
                raise
            except Unavailable:
                self._drop(replica)  # the health watcher re-admits it when it recovers
                log.warning("replica_failed url=%s request=%s started=%s", replica.url, request.request_id, started)
                if started:
                    raise
            finally:
                replica.inflight -= 1
                self._requests.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        replica = self._requests.get(request_id)
        if replica is not None:
            await replica.backend.abort(request_id)

    async def load_adapter(self, name: str, path: str) -> None:
        """On every routable replica, or on none (those that loaded it unload it again)."""
        async with self._lock:
            targets = [r for r in self.replicas if r.routable and name not in r.adapters]
            results = await asyncio.gather(
                *(r.backend.load_adapter(name, path) for r in targets), return_exceptions=True
            )
            failed = [(r, e) for r, e in zip(targets, results) if isinstance(e, BaseException)]
            loaded = [r for r, e in zip(targets, results) if not isinstance(e, BaseException)]
            if failed:
                await asyncio.gather(*(r.backend.unload_adapter(name) for r in loaded), return_exceptions=True)
                replica, exc = failed[0]
                raise Unavailable(
                    f"adapter {name!r} not loaded on every replica ({replica.url}: {exc}); none serve it"
                ) from exc
            for replica in loaded:
                replica.adapters.add(name)
            self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        async with self._lock:
            self._adapters.pop(name, None)
            holders = [r for r in self.replicas if name in r.adapters]
            await asyncio.gather(
                *(r.backend.unload_adapter(name) for r in holders if r.routable), return_exceptions=True
            )
            for replica in holders:
                # A replica that is down keeps it in its memory: harmless, kfresh never asks for this name again
                # (every adapter version has its own name).
                replica.adapters.discard(name)
