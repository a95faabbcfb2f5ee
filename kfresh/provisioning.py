"""`kfresh provision`: make every configured model available locally before a server needs it.

The model paths themselves (packaged names, the GGUF conversion) are `kfresh.models`; this module composes
them with the embedder's ONNX export, which is why it sits above the indexer and models.py does not.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kfresh.core.config import KfreshConfig, ModelsConfig
from kfresh.models import embedder_path, generator_path

log = logging.getLogger("kfresh.models")


def provision(cfg: ModelsConfig | KfreshConfig) -> dict[str, Any]:
    """Make both models available locally (and the embedder's ONNX export when the whole config says it runs
    on onnxruntime); returns their paths and the seconds each took."""
    models = cfg.models if isinstance(cfg, KfreshConfig) else cfg  # the CLI passes the whole config
    report: dict[str, Any] = {}
    for kind, resolve in (("embedder", embedder_path), ("generator", generator_path)):
        t0 = time.perf_counter()
        log.info("provisioning %s: %s", kind, getattr(models, kind))
        report[kind] = resolve(models)
        report[f"{kind}_s"] = round(time.perf_counter() - t0, 3)
        log.info("provisioned %s -> %s in %.2f s", kind, report[kind], report[f"{kind}_s"])
    if isinstance(cfg, KfreshConfig):
        from kfresh.indexer.embedding.embedder import resolve_backend

        if resolve_backend(cfg.embedder.backend, cfg.embedder.device).startswith("onnx"):
            from kfresh.indexer.embedding.onnx_export import onnx_folder

            t0 = time.perf_counter()
            report["embedder_onnx"] = onnx_folder(report["embedder"], models.cache_dir)
            report["embedder_onnx_s"] = round(time.perf_counter() - t0, 3)
    return report
