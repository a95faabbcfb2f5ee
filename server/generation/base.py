"""The server <-> model seam: a narrow async interface that every generation backend implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int = 96
    temperature: float = 0.0
    # Adapter name to apply; None = the base model.
    adapter: str | None = None
    stop: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed output. The last chunk has finished=True (its text may be empty)."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    output_tokens: int = 0


class GenerationBackend(abc.ABC):
    """Lifecycle: `await start()` once, then any number of concurrent `generate()`, then `await shutdown()`."""

    name: str = "base"

    @property
    @abc.abstractmethod
    def model(self) -> str:
        """Name or path of the served model."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once start() finished and the backend has not failed."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream output; cancelling the consumer (or aclose()) aborts the request in the engine.

        Raises kfresh.core.errors.Unavailable when the model is not ready or the engine failed.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def check_health(self) -> bool: ...

    async def serving(self) -> bool:
        """Whether Answer can be served now, for the health service: checks the backend, then `ready`."""
        return await self.check_health() and self.ready

    async def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError(f"{self.name} backend does not serve LoRA adapters yet")

    async def unload_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.name} backend does not serve LoRA adapters yet")
