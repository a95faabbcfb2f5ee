"""answer: TTFT, inter-token latency, end-to-end p50/p99 and output tokens/s over gRPC vs calling vLLM directly.

A concurrency sweep with our grpc.aio load driver (load.closed_loop: bounded in count and time, loopback
only), for both generation backends:
- vllm (in-process AsyncLLM): `kfresh serve` over gRPC, then, in this process after the server stopped, the
  same engine settings called through `VllmEngineBackend.generate` (AsyncLLM, no gRPC, no answer path);
- remote (`vllm serve`): `kfresh serve --generation.backend remote` over gRPC and the same `vllm serve`
  called directly over its streaming OpenAI HTTP API.
`answer_log=[false, true]` runs the in-process server twice, without and with the answer log (every answer
written to the store in the background). Answers are closed-book (no retrieval), greedy, with the same chat messages on both paths; every prompt
carries a unique suffix so no path gets another's prefix-cache hits. Overhead ratio = gRPC / direct.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field

from kfresh.benchmarks.common import SuiteOptions, environment, percentiles
from kfresh.benchmarks.report import Result, Table


class AnswerOptions(SuiteOptions):
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32], description="Concurrent requests per level."
    )
    min_requests: int = Field(8, ge=1, description="Requests per level: max(min_requests, 2 x concurrency).")
    max_tokens: int = Field(64, ge=1, description="Output tokens per answer (upper bound; greedy may stop earlier).")
    level_time_s: float = Field(180.0, gt=0, description="A level stops issuing requests after this long.")
    backends: list[Literal["vllm", "remote"]] = Field(["vllm", "remote"], description="Generation backends.")
    vllm_url: str = Field("", description="With --addr: a `vllm serve` URL to call directly as the baseline.")
    answer_log: list[bool] = Field(
        [True], description="answer_log.enabled of the in-process (vllm) server; [false, true] measures what it costs."
    )

    @classmethod
    def quick(cls) -> AnswerOptions:
        return cls(concurrency=[1, 2], min_requests=2, max_tokens=8, level_time_s=60)


@dataclass
class Sample:
    ttft_ms: float
    total_ms: float
    tokens: int

    @property
    def itl_ms(self) -> float | None:
        return (self.total_ms - self.ttft_ms) / (self.tokens - 1) if self.tokens > 1 else None


def questions() -> list[str]:
    from kfresh.finetuner import datasets

    return [q.question for q in datasets.general_questions()]


def _messages(i: int, tag: str) -> tuple[str, list[dict[str, str]]]:
    from kfresh.prompt import closed_book_messages

    qs = questions()
    question = f"{qs[i % len(qs)]} (request {tag}-{i})"
    return question, closed_book_messages(question)


async def _timed(stream: AsyncIterator[tuple[str, int]]) -> Sample:
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for text, n in stream:
        if text and not ttft:
            ttft = (time.perf_counter() - start) * 1000
        tokens = max(tokens, n)
    return Sample(ttft, (time.perf_counter() - start) * 1000, tokens)


def grpc_call(client: Any, opts: AnswerOptions, tag: str) -> Callable[[int], Awaitable[Sample]]:
    async def stream(i: int) -> AsyncIterator[tuple[str, int]]:
        question, _ = _messages(i, tag)
        async for event in client.answer(
            question, closed_book=True, max_tokens=opts.max_tokens, temperature=0.0, timeout=600
        ):
            if event.HasField("done"):
                yield "", event.done.output_tokens
            else:
                yield event.delta, 0

    return lambda i: _timed(stream(i))


def backend_call(backend: Any, opts: AnswerOptions, tag: str) -> Callable[[int], Awaitable[Sample]]:
    from kfresh.server.generation.base import GenerationRequest

    async def stream(i: int) -> AsyncIterator[tuple[str, int]]:
        _, messages = _messages(i, tag)
        request = GenerationRequest(f"bench-{uuid.uuid4().hex}", messages, max_tokens=opts.max_tokens, temperature=0.0)
        async for chunk in backend.generate(request):
            yield chunk.text, chunk.output_tokens

    return lambda i: _timed(stream(i))


def http_call(client: Any, model: str, opts: AnswerOptions, tag: str) -> Callable[[int], Awaitable[Sample]]:
    async def stream(i: int) -> AsyncIterator[tuple[str, int]]:
        _, messages = _messages(i, tag)
        body = {"model": model, "messages": messages, "max_tokens": opts.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                text = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])
                yield text, int((event.get("usage") or {}).get("completion_tokens") or 0)

    return lambda i: _timed(stream(i))


async def sweep(call: Callable[[int], Awaitable[Sample]], opts: AnswerOptions) -> list[dict[str, Any]]:
    from kfresh.testing.load import closed_loop

    await call(10_000)  # warm-up
    levels = []
    for c in opts.concurrency:
        run = await closed_loop(
            call, concurrency=c, total=max(opts.min_requests, 2 * c), time_limit_s=opts.level_time_s
        )
        samples: list[Sample] = run.samples
        levels.append({"concurrency": c, "wall_s": run.wall_s, "errors": run.errors, "samples": [asdict(s) for s in samples],
                       "output_tok_s": sum(s.tokens for s in samples) / run.wall_s if run.wall_s else 0.0})  # fmt: skip
    return levels


async def measure_pair(
    name: str, addr: str, opts: AnswerOptions, *, backend: Any = None, vllm_url: str = ""
) -> dict[str, Any]:
    """gRPC sweep against `addr`, then the direct sweep (an in-process `backend` or a `vllm serve` URL) if given."""
    from kfresh.testing.servers import aclient

    out: dict[str, Any] = {"backend": name}
    async with aclient(addr) as client:
        out["grpc"] = await sweep(grpc_call(client, opts, f"g{name}"), opts)
    if backend is not None:
        out["direct"] = await sweep(backend_call(backend, opts, f"d{name}"), opts)
        out["direct_kind"] = "VllmEngineBackend.generate (AsyncLLM in-process, no gRPC)"
    elif vllm_url:
        out["direct"] = await http_direct(vllm_url, opts, name)
        out["direct_kind"] = "vllm serve, streaming OpenAI HTTP API"
    return out


async def http_direct(url: str, opts: AnswerOptions, name: str) -> list[dict[str, Any]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        return await sweep(http_call(client, model, opts, f"d{name}"), opts)


def _direct_inprocess(opts: AnswerOptions) -> list[dict[str, Any]]:
    from kfresh.core.config import KfreshConfig
    from kfresh.models import generator_path
    from kfresh.server.generation.vllm_engine import VllmEngineBackend

    cfg = KfreshConfig()

    async def go() -> list[dict[str, Any]]:
        backend = VllmEngineBackend(
            cfg.generation, generator_path(cfg.models), served_model_name="SmolLM2-135M-Instruct", log_stats=False
        )
        await backend.start()
        try:
            return await sweep(backend_call(backend, opts, "dvllm"), opts)
        finally:
            await backend.shutdown()

    return asyncio.run(go())


def run(opts: AnswerOptions, *, addr: str | None = None, quick: bool = False, command: str = "") -> Result:
    from kfresh.core.config import KfreshConfig
    from kfresh.models import generator_path
    from kfresh.testing.servers import kfresh_server, vllm_serve

    cfg = KfreshConfig()
    env = environment(model="SmolLM2-135M-Instruct", dtype=cfg.generation.dtype)
    pairs = []
    if addr:
        with kfresh_server(addr=addr, model=True) as target:
            pairs.append(asyncio.run(measure_pair("external", target.addr, opts, vllm_url=opts.vllm_url)))
    for name in [] if addr else opts.backends:
        if name == "vllm":
            for logged in opts.answer_log:
                with kfresh_server({"answer_log.enabled": logged}, model=True) as target:
                    pairs.append(
                        asyncio.run(measure_pair("vllm" if logged else "vllm (answer log off)", target.addr, opts))
                    )
            pair = pairs.pop()  # the in-process direct baseline sits beside the last server's figures
            pair["direct"] = _direct_inprocess(opts)
            pair["direct_kind"] = "VllmEngineBackend.generate (AsyncLLM in-process, no gRPC)"
        else:
            with (
                vllm_serve(generator_path(cfg.models), dtype=cfg.generation.dtype) as url,
                kfresh_server({"generation.backend": "remote", "generation.remote_url": url}, model=True) as target,
            ):
                pair = asyncio.run(measure_pair("remote", target.addr, opts, vllm_url=url))
        pairs.append(pair)
    return build_result(pairs, opts, quick=quick, command=command, env=env)


def level_figures(level: dict[str, Any]) -> dict[str, float]:
    samples = [Sample(**s) for s in level["samples"]]
    ttft = percentiles([s.ttft_ms for s in samples])
    total = percentiles([s.total_ms for s in samples])
    itl = percentiles([s.itl_ms for s in samples if s.itl_ms is not None])
    return {"ttft_p50": ttft["p50"], "ttft_p99": ttft["p99"], "itl_p50": itl["p50"], "e2e_p50": total["p50"], "e2e_p99": total["p99"],
            "tok_s": level["output_tok_s"], "n": total["n"], "errors": len(level["errors"])}  # fmt: skip


def build_result(
    pairs: list[dict[str, Any]], opts: AnswerOptions, *, quick: bool, command: str, env: dict[str, Any] | None = None
) -> Result:
    result = Result(suite="answer", title="Answer latency and throughput over gRPC vs vLLM direct", command=command, quick=quick,
                    settings=opts.model_dump(), env=env or environment(model="SmolLM2-135M-Instruct"), raw={"pairs": pairs})  # fmt: skip
    for pair in pairs:
        rows, summary = [], {}
        for i, level in enumerate(pair["grpc"]):
            g = level_figures(level)
            d = level_figures(pair["direct"][i]) if pair.get("direct") else None

            def ratio(key: str, g: dict[str, Any] = g, d: dict[str, Any] | None = d) -> float | None:
                return round(g[key] / d[key], 3) if d and d[key] else None

            rows.append([level["concurrency"], g["ttft_p50"], d["ttft_p50"] if d else "-", g["itl_p50"], d["itl_p50"] if d else "-",
                         g["e2e_p50"], g["e2e_p99"], d["e2e_p50"] if d else "-", g["tok_s"], d["tok_s"] if d else "-",
                         ratio("e2e_p50") or "-", ratio("tok_s") or "-", g["errors"] + (d["errors"] if d else 0)])  # fmt: skip
            summary[f"c{level['concurrency']}"] = {"grpc": {k: round(v, 2) for k, v in g.items()},
                                                   "direct": {k: round(v, 2) for k, v in d.items()} if d else None,
                                                   "e2e_p50_ratio": ratio("e2e_p50"), "ttft_p50_ratio": ratio("ttft_p50"),
                                                   "tok_s_ratio": ratio("tok_s")}  # fmt: skip
        result.summary[pair["backend"]] = summary
        result.tables.append(Table(
            f"backend {pair['backend']}: kfresh gRPC vs {pair.get('direct_kind', 'no direct baseline')} (ms; tok/s = output tokens/s)",
            ["concurrency", "TTFT p50 gRPC", "TTFT p50 direct", "ITL p50 gRPC", "ITL p50 direct", "e2e p50 gRPC", "e2e p99 gRPC",
             "e2e p50 direct", "tok/s gRPC", "tok/s direct", "e2e p50 ratio", "tok/s ratio", "errors"], rows,
        ))  # fmt: skip
    result.notes += [
        f"Closed-book answers, greedy, max_tokens={opts.max_tokens}; requests per level: max({opts.min_requests}, 2 x concurrency).",
        "ITL = (end-to-end - TTFT) / (output tokens - 1) per request. The gRPC TTFT is to the first text delta.",
        "kfresh serve and the direct path never run at the same time; for the in-process backend the direct engine is a "
        "fresh one with the same settings, started after the server stopped.",
    ]
    return result


def plot(result: Result, fig: Any) -> None:
    from kfresh.benchmarks.report import series_axes

    ax1, ax2 = series_axes(fig, 2)
    for pair in result.raw["pairs"]:
        for path in ("grpc", "direct"):
            if not pair.get(path):
                continue
            xs = [lv["concurrency"] for lv in pair[path]]
            figs = [level_figures(lv) for lv in pair[path]]
            label = f"{pair['backend']} {'gRPC' if path == 'grpc' else 'direct'}"
            style = "-" if path == "grpc" else "--"
            ax1.plot(xs, [f["tok_s"] for f in figs], style, marker="o", label=label)
            ax2.plot(xs, [f["ttft_p50"] for f in figs], style, marker="o", label=label)
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
