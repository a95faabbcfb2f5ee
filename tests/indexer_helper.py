"""Helpers for the indexer tests, and a script that ingests until it is killed (the SIGKILL test).

Run as: python tests/indexer_helper.py HOME EMBEDDER_PATH COUNT
It prints "ACK <doc_id> <version>" after each durable acknowledgement, flushed, so the parent knows
exactly which documents were promised before it sends SIGKILL.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np


class CountingEmbedder:
    """The real embedder, recording every text it is asked to encode (to prove nothing is re-embedded)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.name = inner.name
        self.encoded: list[str] = []
        self.worker_encoded: list[str] = []  # by the indexing worker, i.e. documents not queries
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            self.encoded.extend(texts)
            if threading.current_thread().name == "kfresh-indexer":
                self.worker_encoded.extend(texts)
        return self.inner.encode(texts)


class GatedEmbedder(CountingEmbedder):
    """Fault injection: the indexing worker's encode calls block until `gate` is set; queries pass."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.worker_waiting = threading.Event()

    def encode(self, texts: list[str]) -> np.ndarray:
        if threading.current_thread().name == "kfresh-indexer":
            self.worker_waiting.set()
            self.gate.wait(60)
        return super().encode(texts)


class FailingEmbedder(CountingEmbedder):
    """Fault injection: raises for any batch that contains `poison`."""

    def __init__(self, inner, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    def encode(self, texts: list[str]) -> np.ndarray:
        if any(self.poison in t for t in texts):
            raise RuntimeError("injected embedder failure")
        return super().encode(texts)


def doc_text(i: int) -> str:
    return f"Record {i}: the lighthouse keeper number {i} logged {i * 7} ships passing the reef at dawn."


def main(argv: list[str]) -> None:
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.documents import DocumentIn
    from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
    from kfresh.indexer.service import Indexer

    home, path, count = Path(argv[0]), argv[1], int(argv[2])
    cfg = KfreshConfig().with_home(home)
    cfg.index.snapshot_every_changes = 7  # snapshots are being written when the kill lands
    cfg.index.snapshot_every_fraction = 0.0
    indexer = Indexer(cfg, embedder=SentenceTransformerEmbedder(path, device="cpu"))
    indexer.start()
    print("READY", flush=True)
    for i in range(count):
        ack = indexer.upsert(DocumentIn(id=f"doc-{i}", text=doc_text(i), metadata={"n": str(i)}))
        print(f"ACK {ack.id} {ack.version}", flush=True)
        if i % 10 == 9:  # let the worker catch up now and then, so the kill finds indexed and pending docs
            indexer.wait_until_indexed(ack.id, ack.version, 60)
    print("DONE", flush=True)
    threading.Event().wait()  # keep ingesting state alive until killed


if __name__ == "__main__":
    main(sys.argv[1:])
