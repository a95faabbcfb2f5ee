"""The measurements that run on the lent GPU machine: one prepared script, runnable without kfresh installed.

That machine has torch, transformers, sentence-transformers and peft, but no faiss, no vllm, no package
registry, and at most 64 MiB travels with a call (../shared/FIELD-NOTES.md). `python -m kfresh.benchmarks.gpu
pack` writes what travels (MiniLM in fp16, SmolLM2's config and tokenizer; ~50 MB); then, through the device
tool with `carry=[".kfresh/gpu-pack"]`:

    python benchmarks/gpu_device.py --pack .kfresh/gpu-pack --out $OUT

writes $OUT/gpu-device.json with, on CUDA and on that machine's CPU side by side:
1. embedding docs/s: sentence-transformers MiniLM on the same ~60-word texts;
2. exact search at 1M x 384: kfresh's TorchIndex (index.kind=torch): add, single-query and batched search
   latency, removal, and a check against a float64 brute force (it must be exact);
3. LoRA training step time for the finetuner's default recipe on the SmolLM2-135M architecture. The 270 MB
   weights cannot travel, so the model is built from its config with random weights: the time of a step
   depends on the shapes, not on the values. No quality is measured here.
The CPU baselines of this box (FAISS flat at 1M, the same steps on 2 cores) come from `kfresh.benchmarks.gpu`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384


def kfresh_from_tree() -> None:
    """Make kfresh.indexer.vectors.torch_exact importable from this source tree where kfresh is not installed:
    bare package objects, so no package __init__ (pydantic, faiss) runs."""
    import importlib.util

    try:
        if importlib.util.find_spec("kfresh.indexer") is not None:
            return  # installed (here): the normal packages
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    for name, folder in (
        ("kfresh", "kfresh"),
        ("kfresh.indexer", "indexer"),
        ("kfresh.indexer.vectors", "indexer/vectors"),
    ):
        module = types.ModuleType(name)
        module.__path__ = [str(root / folder)]
        sys.modules[name] = module


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)), "n": len(samples)}


def texts(n: int, tokenizer_json: Path, seed: int = 0) -> list[str]:
    """~60-word documents of whole-word vocabulary entries of the embedder's tokenizer (deterministic)."""
    words = sorted(w for w in json.loads(tokenizer_json.read_text())["model"]["vocab"] if w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed)
    return [" ".join(words[int(j)] for j in rng.integers(len(words), size=60)) + "." for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def embedding(pack: Path, device: str, docs: int, batch_size: int, dtype: str) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(pack / "minilm"), device=device, local_files_only=True)
    model = model.to(torch.float16 if dtype == "float16" else torch.float32)
    data = texts(docs, pack / "minilm" / "tokenizer.json")
    model.encode(data[:batch_size], batch_size=batch_size)  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    out = model.encode(data, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    sync(device)
    seconds = time.perf_counter() - start
    return {"device": device, "dtype": dtype, "docs": docs, "batch_size": batch_size, "docs_per_s": docs / seconds,
            "dim": int(out.shape[1])}  # fmt: skip


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # in slices: no float64 copy of the whole set
        block = rng.standard_normal((min(100_000, n - start), DIM), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def search(device: str, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> dict[str, Any]:
    kfresh_from_tree()
    from kfresh.indexer.vectors.torch_exact import TorchIndex

    ids = np.arange(len(vectors), dtype=np.int64) + 1_000_000
    index = TorchIndex(DIM, device=device)
    start = time.perf_counter()
    for lo in range(0, len(vectors), 100_000):
        index.add(ids[lo : lo + 100_000], vectors[lo : lo + 100_000])
    sync(device)
    add_s = time.perf_counter() - start
    index.search(queries[:4], k)  # warm-up
    single = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - t)
    batches = []
    for lo in range(0, len(queries) - 31, 32):
        t = time.perf_counter()
        index.search(queries[lo : lo + 32], k)
        batches.append(time.perf_counter() - t)
    gone = ids[::100]
    t = time.perf_counter()
    removed = index.remove(gone)
    sync(device)
    remove_s = time.perf_counter() - t
    _, found = index.search(queries[:5], k)
    keep = np.ones(len(ids), dtype=bool)
    keep[::100] = False
    truth = np.argsort(-(queries[:5].astype(np.float64) @ vectors[keep].astype(np.float64).T), axis=1)[:, :k]
    exact = float(np.mean([len(set(f) & set(ids[keep][t])) / k for f, t in zip(found.tolist(), truth)]))
    return {"device": device, "vectors": len(vectors), "add_s": add_s, "single_query": percentiles(single),
            "batch_32": percentiles(batches), "removed": removed, "remove_s": remove_s, "recall_at_10_vs_float64": exact}  # fmt: skip


def lora_steps(pack: Path, device: str, steps: int, batch: int = 8, tokens: int = 128) -> dict[str, Any]:
    """Seconds per LoRA training step (forward, backward, AdamW) with the finetuner's default recipe."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(pack / "smollm2"))
    model = AutoModelForCausalLM.from_config(config).to(device)  # random weights: the shapes set the time
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
    times = []
    for step in range(steps + 1):  # the first step (allocation, kernel choice) is not counted
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step:
            times.append(time.perf_counter() - t)
    return {"device": device, "steps": steps, "batch": batch, "tokens": tokens, "s_per_step": float(np.median(times)),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def machine() -> dict[str, Any]:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
            "cpu_cores": os.cpu_count(), "platform": platform.platform()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, required=True, help="the folder `kfresh.benchmarks.gpu pack` wrote")
    parser.add_argument("--out", type=Path, required=True, help="where gpu-device.json goes")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors in the search index (default 1M)")
    parser.add_argument("--queries", type=int, default=200, help="search queries (default 200; the CPU gets a quarter)")
    parser.add_argument("--docs", type=int, default=4096, help="documents embedded on CUDA (the CPU gets a quarter)")
    parser.add_argument("--lora-steps", type=int, default=20, help="LoRA steps timed on CUDA (default 20)")
    parser.add_argument("--cpu-lora-steps", type=int, default=3, help="LoRA steps timed on the CPU (default 3)")
    parser.add_argument("--lora-tokens", type=int, default=128, help="tokens per sequence in a LoRA step (default 128)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args) | {"pack": str(args.pack), "out": str(args.out)},
    }
    report["embedding"] = [embedding(args.pack, "cpu", max(32, args.docs // 4), 32, "float32")]
    if cuda:
        report["embedding"] += [embedding(args.pack, "cuda", args.docs, 256, dt) for dt in ("float32", "float16")]
    vectors, queries = unit_vectors(args.vectors, seed=1), unit_vectors(args.queries, seed=2)
    report["search"] = [search("cpu", vectors, queries[: max(40, args.queries // 4)])]
    if cuda:
        report["search"].append(search("cuda", vectors, queries))
    report["lora"] = [lora_steps(args.pack, "cpu", args.cpu_lora_steps, tokens=args.lora_tokens)]
    if cuda:
        report["lora"].append(lora_steps(args.pack, "cuda", args.lora_steps, tokens=args.lora_tokens))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-device.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
