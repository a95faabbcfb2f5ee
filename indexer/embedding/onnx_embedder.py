"""The embedder on onnxruntime: the same vectors as sentence-transformers, several times cheaper per query.

`kfresh.indexer.embedding.onnx_export` turns the model folder into one graph (transformer + mean pooling + L2 norm), once.
Here a fast tokenizer feeds it batches sorted by length (less padding). Each run is single-threaded and a
large encode is split into parallel lanes, one run per core, pulling length-sorted parts. On this 2-core box
lanes embed 1.08x the docs/s of one run on two intra-op threads, and 1.23x beside one or two busy
processes (`python -m kfresh.benchmarks.lanes`): an intra-op thread that loses its core stalls its partner at
every operator, a lane only its own part. A one-part encode (a query) runs in the calling thread, so it never
queues behind the worker's lanes.
fp32 matches torch to ~1e-6 cosine and keeps the model's name (stored vectors stay valid); int8 is a
different vector space and is named so (switching re-embeds).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kfresh.core.errors import Unavailable

log = logging.getLogger("kfresh.indexer")

INT8_SUFFIX = "+onnx-int8"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def split_parts(order: np.ndarray, batch_size: int, lanes: int) -> list[np.ndarray]:
    """Length-sorted indices -> contiguous parts of at most `batch_size`, at least one per lane when there are
    enough texts, as even as possible (np.array_split)."""
    n = len(order)
    parts = max(-(-n // batch_size), min(lanes, n))
    return [p for p in np.array_split(order, parts) if len(p)]


class OnnxEmbedder:
    """An exported embedder folder (see kfresh.indexer.embedding.onnx_export) on the onnxruntime CPU provider.
    `threads` is the number of lanes (0 = the usable cores). The one session is shared by the lanes and runs
    each call on `intra_op_threads` (1: the parallelism comes from the lanes; more, with threads=1, is the
    single multi-threaded run that the lanes replaced, kept for `kfresh.benchmarks.lanes`)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str,
        quantized: bool = False,
        threads: int = 0,
        batch_size: int = 32,
        intra_op_threads: int = 1,
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise Unavailable(f"embedder.backend=onnx needs onnxruntime ({exc}): pip install onnxruntime, "
                              "or set embedder.backend=torch") from exc  # fmt: skip
        from kfresh.indexer.embedding.onnx_export import FP32_FILE, INT8_FILE, read_marker

        folder = Path(folder)
        marker = read_marker(folder)
        self.dim = int(marker["dim"])
        self.name = f"{name}{INT8_SUFFIX}" if quantized else name
        self.batch_size = batch_size
        self.max_tokens = int(marker["max_seq_length"])
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_tokens)
        self._tokenizer.no_padding()  # padding is per length-sorted batch, below
        opts = ort.SessionOptions()
        self.lanes = threads if threads > 0 else usable_cores()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        # Spinning intra-op threads would burn the cores that the lanes and query embedding need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        model = folder / (INT8_FILE if quantized else FP32_FILE)
        self._session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.encode(["warm-up passage " * 24, "warm-up query"])
        log.info("embedder.loaded name=%s dim=%d backend=onnx%s lanes=%d", self.name, self.dim,
                 "-int8" if quantized else "", self.lanes)  # fmt: skip

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        parts = split_parts(order, self.batch_size, self.lanes)
        if len(parts) == 1:
            out[parts[0]] = self._infer(encodings, parts[0])
            return out

        def run(idx: np.ndarray) -> None:
            out[idx] = self._infer(encodings, idx)

        self._in_lanes(parts, run)
        return out

    def _in_lanes(self, parts: list[np.ndarray], run: Callable[[np.ndarray], None]) -> None:
        """Run every part on up to `lanes` threads (this one included), each pulling the next part; the first
        error stops the others from taking more and is raised once all have returned."""
        pending = iter(parts)
        take = threading.Lock()
        failed = threading.Event()

        def lane() -> None:
            while not failed.is_set():
                with take:
                    idx = next(pending, None)
                if idx is None:
                    return
                try:
                    run(idx)
                except BaseException:
                    failed.set()
                    raise

        helpers: list[Future[None]] = [self._lane_pool().submit(lane) for _ in range(min(self.lanes, len(parts)) - 1)]
        try:
            lane()
        finally:
            errors = [f.exception() for f in helpers]  # waits for each helper
        for err in errors:
            if err is not None:
                raise err

    def _lane_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix="kfresh-embed-lane")
        return self._pool

    def _infer(self, encodings: Sequence[Any], idx: np.ndarray) -> np.ndarray:
        """One padded batch through the session (single-threaded; concurrent runs are safe)."""
        batch = [encodings[i] for i in idx]
        width = max(len(e.ids) for e in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64)
        for row, enc in enumerate(batch):
            n = len(enc.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, enc.attention_mask, enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return self._session.run(["embedding"], feeds)[0]
