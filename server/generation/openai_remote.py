"""A remote vLLM OpenAI-compatible server (`vllm serve`) as a generation backend, over httpx.

Streaming uses server-sent events from POST /v1/chat/completions. Closing the HTTP stream is the
abort: vLLM cancels a request whose client disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from kfresh.core.config import GenerationConfig
from kfresh.core.errors import InvalidInput, KfreshError, NotFound, Overloaded, Unavailable
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)


class OpenAIRemoteBackend(GenerationBackend):
    """Client of `vllm serve`; adapters are served under their own model name (runtime LoRA updating on)."""

    name = "remote"

    def __init__(
        self,
        cfg: GenerationConfig,
        *,
        start_timeout_s: float | None = None,
        poll_interval_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._cfg = cfg
        self._base_url = cfg.remote_url.rstrip("/")
        self._model = cfg.remote_model
        self._start_timeout_s = cfg.remote_timeout_s if start_timeout_s is None else start_timeout_s
        self._poll_interval_s = poll_interval_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._healthy = False
        self._inflight: dict[str, httpx.Response] = {}
        self._aborted: set[str] = set()

    @property
    def model(self) -> str:
        return self._model or self._base_url

    @property
    def ready(self) -> bool:
        return self._client is not None and self._healthy

    async def start(self) -> None:
        """Wait until the server answers /health (up to `start_timeout_s`), then pick the model name."""
        if self._client is None:
            timeout = httpx.Timeout(self._cfg.remote_timeout_s, connect=min(5.0, self._cfg.remote_timeout_s))
            self._client = httpx.AsyncClient(base_url=self._base_url, timeout=timeout, transport=self._transport)
        deadline = time.monotonic() + self._start_timeout_s
        last_error = "no answer"
        while True:
            try:
                if await self._health_once():
                    break
                last_error = "/health did not return 200"
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + self._poll_interval_s > deadline:
                raise Unavailable(
                    f"no vLLM server became healthy at {self._base_url} within {self._start_timeout_s:g} s ({last_error})"
                )
            await asyncio.sleep(self._poll_interval_s)
        if not self._model:
            self._model = await self._first_model()
        self._healthy = True
        log.info("remote vLLM server %s ready, model %s", self._base_url, self._model)

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        self._healthy = False
        if client is not None:
            await client.aclose()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        client = self._require_client()
        state = _StreamState()
        rid = request.request_id
        try:
            async with client.stream("POST", "/v1/chat/completions", json=self._body(request)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _http_error(resp, "generation failed")
                self._inflight[rid] = resp
                async for event in _sse_events(resp):
                    for text in state.update(event):
                        yield GenerationChunk(text, output_tokens=state.tokens)
        except httpx.HTTPError as exc:
            if rid not in self._aborted:  # else abort() closed the stream under us
                self._healthy = False
                raise Unavailable(f"remote vLLM server {self._base_url} failed: {type(exc).__name__}") from exc
        except Exception:
            if rid not in self._aborted:
                raise
        finally:
            self._inflight.pop(rid, None)
            aborted = rid in self._aborted
            self._aborted.discard(rid)
        if aborted:
            state.finish_reason = "abort"
        elif not state.done:
            raise Unavailable(f"remote vLLM server {self._base_url} ended the stream early")
        yield GenerationChunk("", True, state.finish_reason or "stop", state.tokens)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.adapter or self._model,  # vLLM serves each adapter under its own name
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "request_id": request.request_id,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def abort(self, request_id: str) -> None:
        """Close the request's HTTP stream; the server aborts the request and the consumer gets 'abort'."""
        resp = self._inflight.get(request_id)
        if resp is not None:
            self._aborted.add(request_id)
            await resp.aclose()

    async def check_health(self) -> bool:
        if self._client is None:
            return False
        try:
            healthy = await self._health_once()
            if healthy and not self._model:  # start() gave up before the server came up: finish it now
                self._model = await self._first_model()
            self._healthy = healthy
        except (httpx.HTTPError, KfreshError):
            self._healthy = False
        return self._healthy

    async def load_adapter(self, name: str, path: str) -> None:
        """Needs the server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.

        In place: the vLLM server may outlive this process and still hold `name` (one name per version).
        """
        body = {"lora_name": name, "lora_path": path, "load_inplace": True}
        await self._post("/v1/load_lora_adapter", body, f"cannot load adapter {name!r}")

    async def unload_adapter(self, name: str) -> None:
        await self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"cannot unload adapter {name!r}")

    async def _health_once(self) -> bool:
        assert self._client is not None
        resp = await self._client.get("/health")
        return resp.status_code == 200

    async def _first_model(self) -> str:
        assert self._client is not None
        resp = await self._client.get("/v1/models")
        if resp.status_code >= 400:
            raise _http_error(resp, "cannot list the remote models")
        models = resp.json().get("data") or []
        if not models:
            raise Unavailable(f"the server at {self._base_url} serves no model")
        return str(models[0]["id"])

    async def _post(self, path: str, body: dict[str, Any], context: str) -> None:
        client = self._require_client()
        try:
            resp = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise Unavailable(f"{context}: remote vLLM server {self._base_url} failed ({type(exc).__name__})") from exc
        if resp.status_code >= 400:
            raise _http_error(resp, context)

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None or not self._model:
            raise Unavailable("the remote generation backend is not started")
        return self._client


class _StreamState:
    """Accumulates one chat-completion stream: token count, finish reason, whether [DONE] arrived."""

    def __init__(self) -> None:
        self.tokens = 0
        self.finish_reason: str | None = None
        self.done = False

    def update(self, event: dict[str, Any] | None) -> list[str]:
        """Texts carried by one SSE event (None = [DONE]); raises on an in-stream error event."""
        if event is None:
            self.done = True
            return []
        if "error" in event:
            raise _error_from_body(event, 500, "generation failed")
        usage = event.get("usage")
        if usage:
            self.tokens = int(usage.get("completion_tokens") or self.tokens)
        texts = []
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or ""
            if text and not usage:
                self.tokens += 1  # vLLM streams one token per event unless told otherwise
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if text:
                texts.append(text)
        return texts


async def _sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """JSON payloads of `data:` lines; None for the closing `[DONE]`."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, other fields
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        if data:
            yield json.loads(data)


def _http_error(resp: httpx.Response, context: str) -> KfreshError:
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text[:500]}}
    return _error_from_body(body, resp.status_code, context)


def _error_from_body(body: dict[str, Any], status: int, context: str) -> KfreshError:
    """Per-request errors keep the server's message; 404 -> NotFound, 429 -> Overloaded, 4xx -> InvalidInput."""
    error = body.get("error", body)
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = error.get("message") or str(body)[:500]
    if isinstance(error.get("code"), int):
        status = error["code"]
    text = f"{context}: {message}"
    if status == 404:
        return NotFound(text)
    if status == 429:
        return Overloaded(text)
    if 400 <= status < 500:
        return InvalidInput(text)
    return Unavailable(text)
