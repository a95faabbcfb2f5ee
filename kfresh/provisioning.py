"""`kfresh provision`: make every configured model available locally before a server needs it.

The model paths themselves (packaged names, the GGUF conversion) are `kfresh.models`; this module composes
them with the embedder's ONNX export, which is why it sits above the indexer and models.py does not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
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


def provision_reader(
    cfg: KfreshConfig,
    dataset: str | Path,
    until: str,
    *,
    dest: Path | None = None,
    budget_s: float | None = None,
    refuse_share: float | None = None,
) -> dict[str, Any]:
    """Build the reader (finetuner/reader.py) from the reading set `dataset` (rows up to `until`) on top of the
    configured generator, once, into the models cache; returns its folder and the build's figures.

    Serve it with `--models.generator FOLDER --answer.prompt_passages 0`: trained beside distractors, it reads
    all k passages better than the best one alone, unlike the base model (README: How answers read the
    passages). A reader already built from the same base, data, cut-off and recipe is reused. `dest`
    overrides the folder, `budget_s` the training time budget, `refuse_share` the share of rows shown without their
    evidence and answered "not in the documents" (default the recipe's `reader.REFUSE_SHARE`)."""
    from kfresh.finetuner.reader import REFUSE_SHARE, build_reader

    source = Path(dataset).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"reading set {source} does not exist (pass --reader-data FILE, a JSONL file)")
    base = generator_path(cfg.models)
    dest = dest or Path(cfg.models.cache_dir).expanduser().resolve() / f"{Path(base).name}-reader"
    t0 = time.perf_counter()
    report = build_reader(cfg, source.resolve(), until, dest, base, budget_s=budget_s,
                          refuse_share=REFUSE_SHARE if refuse_share is None else refuse_share)  # fmt: skip
    log.info("provisioned reader -> %s in %.1f s", dest, time.perf_counter() - t0)
    return {"reader": str(dest), "reader_s": round(time.perf_counter() - t0, 3), "reader_rows": report.rows,
            "serve_with": f"--models.generator {dest} --answer.prompt_passages 0"}  # fmt: skip
