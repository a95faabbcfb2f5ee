"""The embedder on onnxruntime: the same vectors as sentence-transformers, several times cheaper per query.

`kfresh.onnx_export` turns the model folder into one graph (transformer + mean pooling + L2 norm), once.
Here a fast tokenizer feeds it batches sorted by length (less padding), and onnxruntime runs it without
idle spinning, so the indexing worker and query embedding share the cores instead of fighting for them.
fp32 matches torch to ~1e-6 cosine and keeps the model's name (stored vectors stay valid); int8 is a
different vector space and is named so (switching re-embeds).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kfresh.errors import Unavailable

log = logging.getLogger("kfresh.indexer")

INT8_SUFFIX = "+onnx-int8"


class OnnxEmbedder:
    """An exported embedder folder (see kfresh.onnx_export) on the onnxruntime CPU provider."""

    def __init__(
        self, folder: str | Path, *, name: str, quantized: bool = False, threads: int = 0, batch_size: int = 32
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise Unavailable(f"embedder.backend=onnx needs onnxruntime ({exc}): pip install onnxruntime, "
                              "or set embedder.backend=torch") from exc  # fmt: skip
        from kfresh.onnx_export import FP32_FILE, INT8_FILE, read_marker

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
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads would burn the cores the other embedding call (worker vs query) needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        model = folder / (INT8_FILE if quantized else FP32_FILE)
        self._session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.encode(["warm-up passage " * 24, "warm-up query"])
        log.info("embedder.loaded name=%s dim=%d backend=onnx%s", self.name, self.dim, "-int8" if quantized else "")

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [encodings[i] for i in idx]
            width = max(len(e.ids) for e in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            types = np.zeros((len(batch), width), dtype=np.int64)
            for row, enc in enumerate(batch):
                n = len(enc.ids)
                ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, enc.attention_mask, enc.type_ids
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            out[idx] = self._session.run(["embedding"], feeds)[0]
        return out
