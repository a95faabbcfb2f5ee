"""One-time export of a sentence-transformers embedder to ONNX (and an int8 copy) for onnxruntime.

The exported graph takes token ids, attention mask and token type ids and returns the finished
embedding: the transformer, mean pooling over the mask and L2 normalisation are all inside it, so the
runtime side is a tokenizer plus one `session.run`. The export runs locally from the model folder (no
hub access), takes a few seconds, and is cached under `ModelsConfig.cache_dir` with a marker that ties it
to the exact source weights; racing processes export once (a file lock), like the generator conversion.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfresh.core.files import build_dir_once, sha256_file

log = logging.getLogger(__name__)

MARKER = "kfresh-onnx.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
# Bump when the export itself changes, so old caches are rebuilt.
EXPORT_VERSION = 1
OPSET = 17
SUPPORTED_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling")


class ExportError(RuntimeError):
    """The model cannot be exported; the message says why and what to use instead."""


def onnx_folder(source: str | Path, cache_dir: Path) -> Path:
    """The cached ONNX export of the sentence-transformers folder `source`, exported now if missing or stale."""
    src = Path(source)
    weights = _weights_file(src)
    dest = Path(cache_dir).expanduser().resolve() / "onnx" / f"{src.parent.name}-{src.name}"
    if _is_current(dest, weights):
        return dest
    return build_dir_once(
        dest, is_current=lambda: _is_current(dest, weights), build=lambda tmp: export(src, tmp, weights)
    )


def export(src: Path, out: Path, weights: Path) -> dict[str, Any]:
    """Write model.onnx, model-int8.onnx, tokenizer.json and the marker (last) into `out`."""
    pooling = _check_supported(src)
    try:
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from transformers import AutoModel
    except ImportError as exc:
        raise ExportError(
            f"the ONNX export needs torch, transformers, onnx and onnxruntime ({exc}); or set embedder.backend=torch"
        ) from exc
    t0 = time.perf_counter()
    log.info("exporting embedder %s to ONNX -> %s (one time, a few seconds)", src, out)
    # Eager attention traces into plain ops; the SDPA path bakes Python-side shape checks into the graph.
    model = AutoModel.from_pretrained(str(src), attn_implementation="eager", local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "token_type_ids": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}}  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")  # tracer notes about shape checks that hold for every input here
        torch.onnx.export(
            _Pooled(model), (ids, mask, torch.zeros_like(ids)), str(out / FP32_FILE),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embedding"],
            dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
        quantize_dynamic(str(out / FP32_FILE), str(out / INT8_FILE), weight_type=QuantType.QInt8)
    shutil.copy2(src / "tokenizer.json", out / "tokenizer.json")
    stat = weights.stat()
    marker = {
        "source": str(src), "source_sha256": sha256_file(weights), "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns, "export_version": EXPORT_VERSION, "opset": OPSET,
        "dim": int(model.config.hidden_size), "max_seq_length": _max_seq_length(src, model.config),
        "pooling": pooling, "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    for path in out.iterdir():
        path.chmod(0o644)
    part = out / f"{MARKER}.part"
    part.write_text(json.dumps(marker, indent=2))
    part.replace(out / MARKER)
    log.info("exported the embedder to ONNX in %.1f s", marker["seconds"])
    return marker


def read_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MARKER).read_text())


class _Pooled:
    """Transformer + mean pooling + L2 norm as one traced module (built lazily: torch is imported late)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                hidden = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return Pooled()


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer advises pre-processing on the root logger; the export is fine without it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _check_supported(src: Path) -> str:
    """Only Transformer -> mean Pooling (-> Normalize) models export; anything else says so."""
    try:
        modules = json.loads((src / "modules.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src} has no readable modules.json; set embedder.backend=torch") from exc
    kinds = [m.get("type", "") for m in modules]
    if kinds[:2] != list(SUPPORTED_MODULES) or any(k != "sentence_transformers.models.Normalize" for k in kinds[2:]):
        raise ExportError(f"the ONNX export supports Transformer + mean Pooling (+ Normalize) models, not {kinds}; "
                          "set embedder.backend=torch")  # fmt: skip
    pooling = json.loads((src / modules[1]["path"] / "config.json").read_text())
    on = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if on != ["pooling_mode_mean_tokens"]:
        raise ExportError(
            f"the ONNX export supports mean pooling only, this model uses {on}; set embedder.backend=torch"
        )
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src} has no tokenizer.json (a fast tokenizer is needed); set embedder.backend=torch")
    return "mean"


def _max_seq_length(src: Path, config: Any) -> int:
    try:
        return int(json.loads((src / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return int(getattr(config, "max_position_embeddings", 512))


def _weights_file(src: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name
    raise ExportError(f"{src} holds no model weights (model.safetensors); set models.embedder to a model folder")


def _is_current(dest: Path, weights: Path) -> bool:
    try:
        marker = read_marker(dest)
    except (OSError, ValueError):
        return False
    if marker.get("export_version") != EXPORT_VERSION or not (dest / FP32_FILE).is_file():
        return False
    stat = weights.stat()
    if marker.get("source_size") == stat.st_size and marker.get("source_mtime_ns") == stat.st_mtime_ns:
        return True
    return marker.get("source_sha256") == sha256_file(weights)
