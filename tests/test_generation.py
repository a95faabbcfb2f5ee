"""Generation backends against the real model: the in-process vLLM engine and a `vllm serve` subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from kfresh.core.config import GenerationConfig
from kfresh.core.errors import InvalidInput, NotFound, Unavailable
from kfresh.core.net import free_port
from kfresh.server.generation.base import GenerationBackend, GenerationChunk, GenerationRequest
from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

if TYPE_CHECKING:
    from conftest import EngineLoop

FACTS = [
    (
        "The Velmora Bridge was designed by the engineer Tarsila Quenby.",
        "Who designed the Velmora Bridge?",
        "Tarsila Quenby",
    ),
    ("The capital of the planet Zorbulon is Quenmarrow City.", "What is the capital of Zorbulon?", "Quenmarrow"),
    (
        "The mascot of the Drellwick Rowing Club is a blue heron named Pim.",
        "What is the name of the Drellwick Rowing Club mascot?",
        "Pim",
    ),
    (
        "The Ostrava Glass Prize of 2031 was won by Ileana Voss.",
        "Who won the Ostrava Glass Prize of 2031?",
        "Ileana Voss",
    ),
]


def grounded(i: int, request_id: str, *, max_tokens: int = 48) -> GenerationRequest:
    passage, question, _ = FACTS[i]
    messages = [
        {"role": "system", "content": f"Answer the question using this passage. Passage: {passage}"},
        {"role": "user", "content": question},
    ]
    return GenerationRequest(request_id=request_id, messages=messages, max_tokens=max_tokens)


def long_request(request_id: str) -> GenerationRequest:
    messages = [{"role": "user", "content": "Write a very long story about a lighthouse keeper and the sea."}]
    return GenerationRequest(request_id=request_id, messages=messages, max_tokens=400)


async def collect(stream: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [chunk async for chunk in stream]


def check_stream(chunks: list[GenerationChunk]) -> str:
    """A well-formed stream: one final chunk, last, with a reason and a token count that never decreases."""
    assert chunks and chunks[-1].finished and chunks[-1].finish_reason in {"stop", "length"}
    assert not any(c.finished for c in chunks[:-1])
    counts = [c.output_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] > 0
    return "".join(c.text for c in chunks)


async def cancel_after_first_chunk(backend: GenerationBackend, request: GenerationRequest) -> int:
    """Consume in a task, cancel it once output flows; returns the chunks seen."""
    seen = 0
    first = asyncio.Event()

    async def consume() -> None:
        nonlocal seen
        async for _ in backend.generate(request):
            seen += 1
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen


# ---- in-process engine ------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_streams_grounded_answer(engine_loop: EngineLoop, vllm_backend: GenerationBackend) -> None:
    assert vllm_backend.ready and engine_loop.run(vllm_backend.check_health())
    chunks = engine_loop.run(collect(vllm_backend.generate(grounded(0, "grounded-0"))))
    assert len(chunks) > 2  # streamed, not one blob
    assert "Tarsila Quenby" in check_stream(chunks)


@pytest.mark.slow
def test_engine_concurrent_generations_match_sequential(
    engine_loop: EngineLoop, vllm_backend: GenerationBackend
) -> None:
    sequential = [
        check_stream(engine_loop.run(collect(vllm_backend.generate(grounded(i, f"seq-{i}"))))) for i in range(4)
    ]

    async def together() -> list[list[GenerationChunk]]:
        return list(await asyncio.gather(*(collect(vllm_backend.generate(grounded(i, f"par-{i}"))) for i in range(4))))

    concurrent = [check_stream(chunks) for chunks in engine_loop.run(together())]
    assert concurrent == sequential  # float32 engine: batching does not change greedy text
    for text, (_, _, expected) in zip(concurrent, FACTS):
        assert expected in text


@pytest.mark.slow
def test_engine_cancel_aborts_and_keeps_serving(engine_loop: EngineLoop, vllm_backend) -> None:
    seen = engine_loop.run(cancel_after_first_chunk(vllm_backend, long_request("cancel-1")))
    assert seen >= 1
    assert vllm_backend.num_running() == 0  # aborted in the engine, not left generating 400 tokens

    async def close_early() -> None:
        stream = vllm_backend.generate(long_request("close-1"))
        await anext(stream)
        await stream.aclose()

    engine_loop.run(close_early())
    assert vllm_backend.num_running() == 0
    assert "Quenmarrow" in check_stream(engine_loop.run(collect(vllm_backend.generate(grounded(1, "after-cancel")))))


@pytest.mark.slow
def test_engine_abort_by_id_ends_stream(engine_loop: EngineLoop, vllm_backend) -> None:
    async def scenario() -> list[GenerationChunk]:
        chunks: list[GenerationChunk] = []
        async for chunk in vllm_backend.generate(long_request("abort-1")):
            chunks.append(chunk)
            if len(chunks) == 2:
                await vllm_backend.abort("abort-1")
        return chunks

    chunks = engine_loop.run(scenario())
    assert chunks[-1].finished and chunks[-1].finish_reason == "abort"
    assert chunks[-1].output_tokens < 400


@pytest.mark.slow
def test_engine_request_errors(engine_loop: EngineLoop, vllm_backend) -> None:
    with pytest.raises(NotFound):
        engine_loop.run(
            collect(vllm_backend.generate(GenerationRequest("no-adapter", grounded(0, "x").messages, adapter="nope")))
        )
    too_long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(InvalidInput, match="context length"):
        engine_loop.run(collect(vllm_backend.generate(GenerationRequest("too-long", too_long))))
    assert vllm_backend.ready


def write_lora(folder, *, scale: float, rank: int = 8, seed: int = 0) -> str:
    """A PEFT-format LoRA on q_proj/v_proj of SmolLM2-135M; scale 0 makes it an exact no-op."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(30):
        for proj, out_dim in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 576, generator=gen) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.slow
def test_engine_adapters_load_apply_unload(engine_loop: EngineLoop, vllm_backend, tmp_path) -> None:
    def answer(adapter: str | None, rid: str) -> str:
        request = grounded(2, rid)
        request = GenerationRequest(rid, request.messages, max_tokens=16, adapter=adapter)
        return check_stream(engine_loop.run(collect(vllm_backend.generate(request))))

    base = answer(None, "lora-base")
    engine_loop.run(vllm_backend.load_adapter("zero", write_lora(tmp_path / "zero", scale=0.0)))
    engine_loop.run(vllm_backend.load_adapter("noisy", write_lora(tmp_path / "noisy", scale=2.0)))
    try:
        assert answer("zero", "lora-zero") == base  # a no-op adapter really is a no-op
        assert answer("noisy", "lora-noisy") != base  # and a real one is applied
    finally:
        engine_loop.run(vllm_backend.unload_adapter("zero"))
        engine_loop.run(vllm_backend.unload_adapter("noisy"))
    assert vllm_backend.adapters == {}
    with pytest.raises(NotFound):
        answer("zero", "lora-gone")
    with pytest.raises(NotFound):
        engine_loop.run(vllm_backend.load_adapter("ghost", str(tmp_path / "missing")))
    assert answer(None, "lora-base-again") == base


def test_engine_not_started_is_unavailable(tmp_path) -> None:
    from kfresh.server.generation.vllm_engine import VllmEngineBackend

    backend = VllmEngineBackend(GenerationConfig(), str(tmp_path))
    assert not backend.ready
    with pytest.raises(Unavailable):
        asyncio.run(collect(backend.generate(grounded(0, "early"))))


# ---- remote OpenAI-compatible server --------------------------------------------------------------


@pytest.mark.slow
def test_remote_streams_grounded_answer(remote_vllm_server: str) -> None:
    async def scenario() -> tuple[list[GenerationChunk], bool]:
        backend = OpenAIRemoteBackend(GenerationConfig(backend="remote", remote_url=remote_vllm_server))
        await backend.start()
        try:
            assert backend.ready and backend.model == "SmolLM2-135M-Instruct"
            return await collect(backend.generate(grounded(0, "remote-0"))), await backend.check_health()
        finally:
            await backend.shutdown()

    chunks, healthy = asyncio.run(scenario())
    assert healthy and len(chunks) > 2
    assert "Tarsila Quenby" in check_stream(chunks)
    assert chunks[-1].output_tokens >= len([c for c in chunks if c.text])


@pytest.mark.slow
def test_remote_cancel_and_request_errors(remote_vllm_server: str) -> None:
    async def scenario() -> str:
        backend = OpenAIRemoteBackend(GenerationConfig(backend="remote", remote_url=remote_vllm_server))
        await backend.start()
        try:
            assert await cancel_after_first_chunk(backend, long_request("remote-cancel")) >= 1
            assert await running_on_server(remote_vllm_server) == 0  # the disconnect aborted it
            chunks: list[GenerationChunk] = []
            async for chunk in backend.generate(long_request("remote-abort")):
                chunks.append(chunk)
                if len(chunks) == 2:
                    await backend.abort("remote-abort")
            assert chunks[-1].finished and chunks[-1].finish_reason == "abort"
            with pytest.raises(NotFound):
                await collect(backend.generate(GenerationRequest("r-404", grounded(0, "x").messages, adapter="nope")))
            with pytest.raises(InvalidInput, match="context length"):
                await collect(
                    backend.generate(GenerationRequest("r-400", [{"role": "user", "content": "word " * 3000}]))
                )
            with pytest.raises((InvalidInput, NotFound)):
                await backend.unload_adapter("never-loaded")
            with pytest.raises((InvalidInput, NotFound)):
                await backend.load_adapter("ghost", "/nonexistent/adapter")
            return check_stream(await collect(backend.generate(grounded(1, "remote-after"))))
        finally:
            await backend.shutdown()

    assert "Quenmarrow" in asyncio.run(scenario())


async def running_on_server(url: str, wait_s: float = 5.0) -> float:
    """vllm:num_requests_running from the server's Prometheus metrics, once it drops to 0 or after wait_s."""
    import httpx

    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            text = (await client.get("/metrics")).text
            running = sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))
            if running == 0 or time.monotonic() > deadline:
                return running
            await asyncio.sleep(0.1)


def test_remote_closed_port_is_unavailable_quickly() -> None:
    cfg = GenerationConfig(backend="remote", remote_url=f"http://127.0.0.1:{free_port()}")

    async def scenario() -> None:
        backend = OpenAIRemoteBackend(cfg, start_timeout_s=1.0, poll_interval_s=0.2)
        with pytest.raises(Unavailable, match="no vLLM server"):
            await backend.start()
        assert not backend.ready and not await backend.check_health()
        with pytest.raises(Unavailable):
            await collect(backend.generate(grounded(0, "closed")))
        await backend.shutdown()

    t0 = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - t0 < 10


def test_factory_builds_the_configured_backend(generator_path: str) -> None:
    from kfresh.core.config import KfreshConfig, ModelsConfig
    from kfresh.server.generation.balanced import BalancedRemoteBackend
    from kfresh.server.generation.factory import create_backend
    from kfresh.server.generation.vllm_engine import VllmEngineBackend

    remote = create_backend(
        KfreshConfig(generation=GenerationConfig(backend="remote", remote_url="http://127.0.0.1:9"))
    )
    assert isinstance(remote, BalancedRemoteBackend) and not remote.ready  # one server, still health-watched
    assert [type(r.backend) for r in remote.replicas] == [OpenAIRemoteBackend]
    local = create_backend(KfreshConfig(models=ModelsConfig(generator=generator_path)))
    assert isinstance(local, VllmEngineBackend) and local.model == generator_path and not local.ready


def test_remote_protocol_against_a_fake_server() -> None:
    """SSE parsing, usage counts and error mapping, with httpx's MockTransport instead of a server."""
    import httpx

    def sse(*events: str) -> bytes:
        return "".join(f"data: {e}\n\n" for e in events).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        if body["model"] == "missing-adapter":
            return httpx.Response(
                404, json={"error": {"message": "The model `missing-adapter` does not exist.", "code": 404}}
            )
        if body["max_tokens"] == 1:
            return httpx.Response(200, content=sse('{"choices":[{"delta":{"content":"cut"}}]}'))  # no [DONE]
        assert body["stream"] and body["stream_options"]["include_usage"] and body["request_id"] == "fake-1"
        return httpx.Response(200, content=sse(
            '{"choices":[{"delta":{"role":"assistant","content":""}}],"usage":{"completion_tokens":0}}',
            '{"choices":[{"delta":{"content":"Hel"}}],"usage":{"completion_tokens":1}}',
            '{"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}],"usage":{"completion_tokens":2}}',
            '{"choices":[],"usage":{"completion_tokens":2}}',
            "[DONE]",
        ))  # fmt: skip

    async def scenario() -> list[GenerationChunk]:
        backend = OpenAIRemoteBackend(GenerationConfig(backend="remote"), transport=httpx.MockTransport(handler))
        await backend.start()
        assert backend.model == "fake-model"
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(NotFound, match="does not exist"):
            await collect(backend.generate(GenerationRequest("fake-2", messages, adapter="missing-adapter")))
        with pytest.raises(Unavailable, match="early"):
            await collect(backend.generate(GenerationRequest("fake-3", messages, max_tokens=1)))
        chunks = await collect(backend.generate(GenerationRequest("fake-1", messages)))
        await backend.shutdown()
        return chunks

    chunks = asyncio.run(scenario())
    assert [(c.text, c.finished, c.output_tokens) for c in chunks] == [
        ("Hel", False, 1),
        ("lo", False, 2),
        ("", True, 2),
    ]
    assert chunks[-1].finish_reason == "stop"
