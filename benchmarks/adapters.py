"""What serving LoRA adapters costs with in-process vLLM: enable_lora off vs on, with and without an adapter.

    .venv/bin/python benchmarks/adapters.py [--dtype bfloat16] [--out benchmarks/results]

For each engine (enable_lora false, then true) it measures TTFT (sequential requests), single-stream
decode rate and the rate at 8 concurrent requests. The LoRA engine is also measured with a synthetic
rank-16 adapter on all linear layers (the finetuner's default shape), and the AdapterManager's
publish -> served time and rollback time against a temporary registry. Results go to
benchmarks/results/adapters-<date>.json and .md. The box is a noisy 2-core CPU: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

PROMPTS = [
    "Write a short poem about autumn leaves.", "Name three uses of copper.", "Describe a busy harbour at dawn.",
    "Explain how a ferry timetable works.", "What makes a good library?", "Tell me about lighthouses.",
    "Why do trams run on rails?", "Describe a market on a rainy day.",
]  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_path: str, out: Path) -> Path:
    """A rank-16 adapter on all linear layers with random non-zero weights (shape of a distilled one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(str(out))
    return out


async def _one(backend: Any, prompt: str, adapter: str | None, max_tokens: int) -> tuple[float, float, int]:
    from kfresh.server.generation.base import GenerationRequest

    request = GenerationRequest(
        f"b-{uuid.uuid4().hex}", [{"role": "user", "content": prompt}], max_tokens=max_tokens, adapter=adapter
    )
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    async for chunk in backend.generate(request):
        if chunk.text and not ttft:
            ttft = time.perf_counter() - start
        tokens = max(tokens, chunk.output_tokens)
    return ttft * 1000, time.perf_counter() - start, tokens


async def measure(backend: Any, adapter: str | None, *, rounds: int = 2) -> dict[str, float]:
    await _one(backend, "Warm up.", adapter, 8)
    ttfts, single = [], []
    for r in range(rounds):
        for i, prompt in enumerate(PROMPTS):
            ttft, total, tokens = await _one(backend, f"{prompt} ({r}-{i})", adapter, 48)
            ttfts.append(ttft)
            single.append(tokens / total)
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(backend, f"{p} (batch)", adapter, 48) for p in PROMPTS))
    batch_rate = sum(r[2] for r in results) / (time.perf_counter() - start)
    return {
        "ttft_p50_ms": statistics.median(ttfts),
        "single_tok_s": statistics.median(single),
        "batch8_tok_s": batch_rate,
    }


async def swap_figures(backend: Any, model_path: str, adapter_dir: Path, root: Path) -> dict[str, float]:
    from kfresh.finetuner.registry import AdapterRegistry
    from kfresh.server.adapters import AdapterManager

    registry = AdapterRegistry(root / "registry")
    meta: dict[str, Any] = {
        "base_model": model_path,
        "base_model_sha256": "-",
        "training_data_sha256": "-",
        "gate_passed": True,
    }
    registry.publish(adapter_dir, **meta)
    manager = AdapterManager(registry, backend)
    await manager.sync()
    start = time.perf_counter()
    v2 = registry.publish(adapter_dir, **meta).version
    await manager.sync()  # what the watcher does once it sees the new CURRENT.json
    publish_to_served = (time.perf_counter() - start) * 1000
    assert manager.current_version == v2
    await asyncio.sleep(0.5)  # the rollback target is loaded in the background
    start = time.perf_counter()
    await manager.rollback()
    rollback_ms = (time.perf_counter() - start) * 1000
    await manager.close()
    return {"publish_to_served_ms": publish_to_served, "rollback_ms": rollback_ms}


async def run(model_path: str, dtype: str, root: Path) -> dict[str, Any]:
    from kfresh.core.config import GenerationConfig
    from kfresh.server.generation.vllm_engine import VllmEngineBackend

    adapter_dir = make_adapter(model_path, root / "adapter")
    out: dict[str, Any] = {}
    for enable_lora in (False, True):
        backend = VllmEngineBackend(GenerationConfig(dtype=dtype, enable_lora=enable_lora), model_path, log_stats=False)
        await backend.start()
        try:
            key = "lora_on" if enable_lora else "lora_off"
            out[key] = await measure(backend, None)
            if enable_lora:
                await backend.load_adapter("bench", str(adapter_dir))
                out["lora_on_with_adapter"] = await measure(backend, "bench")
                await backend.unload_adapter("bench")
                out["swap"] = await swap_figures(backend, model_path, adapter_dir, root)
        finally:
            await backend.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from kfresh.core.config import ModelsConfig
    from kfresh.models import generator_path

    model_path = generator_path(ModelsConfig(cache_dir=Path(".kfresh/models")))
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(run(model_path, args.dtype, Path(tmp)))
    off, on, tuned = figures["lora_off"], figures["lora_on"], figures["lora_on_with_adapter"]
    rows = [
        ("TTFT p50 (ms)", "ttft_p50_ms"), ("single stream (tok/s)", "single_tok_s"), ("8 concurrent (tok/s)", "batch8_tok_s"),
    ]  # fmt: skip
    lines = [
        f"# Adapter serving cost ({args.dtype}, in-process vLLM, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')})",
        "", "| figure | enable_lora=false | enable_lora=true, no adapter | with a rank-16 adapter |", "|---|---|---|---|",
    ]  # fmt: skip
    for label, key in rows:
        lines.append(
            f"| {label} | {off[key]:.1f} | {on[key]:.1f} ({on[key] / off[key] - 1:+.0%}) | {tuned[key]:.1f} ({tuned[key] / off[key] - 1:+.0%}) |"
        )
    swap = figures["swap"]
    lines += [
        "",
        f"publish -> served (sha256 + load + switch): {swap['publish_to_served_ms']:.0f} ms; rollback: {swap['rollback_ms']:.1f} ms",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"adapters-{time.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
