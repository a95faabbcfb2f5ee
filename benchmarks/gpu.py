"""The GPU part of issue 5, around `gpu_device.py` (what runs on the lent GPU machine).

    python -m kfresh.benchmarks.gpu pack [--pack .kfresh/gpu-pack]      # what travels to the device (< 64 MiB)
    # device tool: carry=[".kfresh/gpu-pack"],
    #   command="python benchmarks/gpu_device.py --pack .kfresh/gpu-pack --out $OUT"
    python -m kfresh.benchmarks.gpu report --device-json FETCHED/gpu-device.json [--out benchmarks/results]

`report` measures this box's side in the same shapes (kfresh's onnx and torch embedders, FAISS flat and the
torch index at 1M vectors, the LoRA step) and writes gpu-<date>.json/.md with both, labelled with the device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from kfresh.benchmarks import gpu_device as dev

CARRY_LIMIT = 64 * 2**20


def pack(folder: Path) -> int:
    """MiniLM in fp16 (its vectors; ~45 MB) and SmolLM2's config (the LoRA step's shapes); returns the bytes."""
    from sentence_transformers import SentenceTransformer

    from kfresh.core.config import KfreshConfig
    from kfresh.models import embedder_path, generator_path

    cfg = KfreshConfig()
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "smollm2").mkdir(parents=True)
    SentenceTransformer(embedder_path(cfg.models), device="cpu", local_files_only=True).half().save(
        str(folder / "minilm")
    )
    shutil.copy(Path(generator_path(cfg.models)) / "config.json", folder / "smollm2" / "config.json")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > CARRY_LIMIT:
        raise SystemExit(f"{folder} holds {size / 2**20:.1f} MiB, more than the 64 MiB a device call carries")
    return size


def here(
    pack_dir: Path, vectors: int, queries: int, docs: int, *, lora_steps: int = 3, lora_tokens: int = 128
) -> dict[str, Any]:
    """This box's side: the same measurements, plus kfresh's CPU defaults (onnx embedder, FAISS flat)."""
    from kfresh.benchmarks.ingest import encode_rate
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder
    from kfresh.indexer.vectors.flat import FlatIndex

    data = dev.texts(docs, pack_dir / "minilm" / "tokenizer.json")
    onnx = create_embedder(KfreshConfig(embedder={"backend": "onnx"}))
    out: dict[str, Any] = {"embedding": [dev.embedding(pack_dir, "cpu", docs, 32, "float32"),
                                         {"device": "cpu", "dtype": "onnx fp32", "docs": docs, "batch_size": 32,
                                          "docs_per_s": encode_rate(onnx.encode, data, 32)}]}  # fmt: skip
    vecs, qs = dev.unit_vectors(vectors, seed=1), dev.unit_vectors(queries, seed=2)
    out["search"] = [dev.search("cpu", vecs, qs)]
    flat = FlatIndex(dev.DIM)
    start = time.perf_counter()
    flat.add(np.arange(len(vecs), dtype=np.int64), vecs)
    add_s = time.perf_counter() - start
    single = []
    for q in qs:
        t = time.perf_counter()
        flat.search(q[None], 10)
        single.append(time.perf_counter() - t)
    out["faiss_flat"] = {"vectors": len(vecs), "add_s": add_s, "single_query": dev.percentiles(single)}
    out["lora"] = [dev.lora_steps(pack_dir, "cpu", lora_steps, tokens=lora_tokens)]
    return out


def report(device: dict[str, Any], mine: dict[str, Any], out: Path, command: str) -> Any:
    from kfresh.benchmarks.common import environment
    from kfresh.benchmarks.report import Result, Table, write_result

    gpu = device["machine"].get("gpu") or "none (CUDA unavailable there)"
    label = f"{gpu}, {device['machine']['cpu_cores']} CPU cores"
    result = Result(suite="gpu", title=f"GPU machine ({label}) vs this box", command=command, quick=False,
                    settings=device["settings"], env=environment(device=device["machine"]),
                    raw={"device": device, "here": mine})  # fmt: skip

    def pick(rows: list[dict[str, Any]], dev_name: str, dtype: str | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r["device"] == dev_name and (dtype is None or r.get("dtype") == dtype)), None)

    rows: list[list[Any]] = []
    for where, rows_of in (("this box", mine["embedding"]), ("device", device["embedding"])):
        rows += [[f"embed docs/s, {where}, {r['device']} {r['dtype']}", round(r["docs_per_s"], 1)] for r in rows_of]
    for where, rows_of in (("this box", mine["search"]), ("device", device["search"])):
        for r in rows_of:
            rows.append([f"1M exact search, torch index, {where} {r['device']}: single query p50 / batch of 32 p50 (ms)",
                         f"{r['single_query']['p50_ms']:.2f} / {r['batch_32']['p50_ms']:.2f} (recall@10 vs float64 "
                         f"{r['recall_at_10_vs_float64']:.3f}; add {r['add_s']:.1f} s; remove {r['removed']} in {r['remove_s']:.2f} s)"])  # fmt: skip
    rows.append(["1M exact search, FAISS flat (kfresh's default), this box: single query p50 (ms)",
                 round(mine["faiss_flat"]["single_query"]["p50_ms"], 2)])  # fmt: skip
    for where, rows_of in (("this box", mine["lora"]), ("device", device["lora"])):
        rows += [[f"LoRA step (r16, all linear layers, {r['batch']} x {r['tokens']} tokens), {where} {r['device']} (s)",
                  round(r["s_per_step"], 3)] for r in rows_of]  # fmt: skip
    result.tables.append(Table("Measured", ["figure", "value"], rows))
    faiss_ms = mine["faiss_flat"]["single_query"]["p50_ms"]
    cuda_search, cuda_lora, cpu_lora = (
        pick(device["search"], "cuda"),
        pick(device["lora"], "cuda"),
        pick(mine["lora"], "cpu"),
    )
    cuda_embed, onnx = pick(device["embedding"], "cuda", "float16"), pick(mine["embedding"], "cpu", "onnx fp32")
    if cuda_search:
        result.summary["torch_cuda_search_vs_faiss_cpu_here_p50"] = round(
            cuda_search["single_query"]["p50_ms"] / faiss_ms, 4
        )
    if cuda_lora and cpu_lora:
        result.summary["lora_step_cuda_vs_here"] = round(cuda_lora["s_per_step"] / cpu_lora["s_per_step"], 4)
    if cuda_embed and onnx:
        result.summary["embed_cuda_fp16_vs_onnx_here"] = round(cuda_embed["docs_per_s"] / onnx["docs_per_s"], 2)
    result.summary["gpu"] = gpu
    result.notes.append(
        "The LoRA step runs the SmolLM2-135M architecture with random weights (the 270 MB weights cannot "
        "travel to the device): a step's time depends on the shapes, not the values. No quality is measured."
    )
    result.notes.append(
        "The device's embedder is MiniLM stored in fp16 (what fits in a device call), run in fp32 and fp16."
    )
    return write_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write what travels to the device")
    p.add_argument("--pack", type=Path, default=Path(".kfresh/gpu-pack"))
    r = sub.add_parser("report", help="measure this box and write gpu-<date>.json/.md with the device's figures")
    r.add_argument("--device-json", type=Path, required=True)
    r.add_argument("--pack", type=Path, default=Path(".kfresh/gpu-pack"))
    r.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.cmd == "pack":
        print(f"{args.pack}: {pack(args.pack) / 2**20:.1f} MiB")
        return
    device = json.loads(args.device_json.read_text())
    s = device["settings"]
    mine = here(
        args.pack,
        s["vectors"],
        max(40, s["queries"] // 4),
        max(32, s["docs"] // 4),
        lora_steps=s["cpu_lora_steps"],
        lora_tokens=s["lora_tokens"],
    )
    written = report(device, mine, args.out, f"python -m kfresh.benchmarks.gpu report --device-json {args.device_json}")
    print(f"wrote {written.json}, {written.markdown}")


if __name__ == "__main__":
    main()
