"""Benchmark corpora: deterministic topic-structured texts, their real MiniLM embeddings (cached), derived sets.

Texts are synthetic but not uniform noise: each document draws most of its ~40 words from one of
`TOPICS` word sets taken from the embedder's own vocabulary, so the embeddings are clustered the way a
real collection's are (FIELD-NOTES: uniform random vectors make approximate indexes look terrible).
Embeddings are computed once with the packaged all-MiniLM-L6-v2 and cached in 10k shards under
`.kfresh/bench-cache/`, so a rerun only embeds what is missing.

Above what was embedded, `derived_vectors` makes a LARGER set from the real one: copy c of vector p is
normalize(v_p + noise) with cosine ~0.9 to its parent. Results that use it say so ("derived").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger("kfresh.bench")

CACHE_DIR = Path(".kfresh/bench-cache")
VERSION = "v1"
TOPICS = 1000
SHARD = 10_000
WORDS_PER_DOC = 32


@cache
def vocabulary() -> tuple[str, ...]:
    """Whole English words from the embedder's WordPiece vocabulary (deterministic, ~20k words)."""
    from kfresh.core.config import ModelsConfig
    from kfresh.models import embedder_path

    vocab = Path(embedder_path(ModelsConfig())) / "vocab.txt"
    words = [w for w in vocab.read_text(encoding="utf-8").split() if w.isascii() and w.isalpha() and len(w) >= 4]
    return tuple(words)


@cache
def _topics() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.integers(0, len(vocabulary()), size=(TOPICS, 30))


def text(i: int) -> str:
    """Document i: ~75% topic words, ~25% words from anywhere; deterministic in i."""
    words = vocabulary()
    rng = np.random.default_rng(i + 1_000_003)
    topic = _topics()[int(rng.integers(TOPICS))]
    picks = [int(topic[rng.integers(len(topic))]) if rng.random() < 0.75 else int(rng.integers(len(words)))
             for _ in range(WORDS_PER_DOC)]  # fmt: skip
    body = " ".join(words[p] for p in picks)
    return body[0].upper() + body[1:] + "."


def texts(n: int, *, start: int = 0) -> list[str]:
    return [text(i) for i in range(start, start + n)]


def query(j: int, n_docs: int) -> tuple[str, int]:
    """A keyword query about one document of the first n_docs: 10 of its words, shuffled; returns (query, doc)."""
    rng = np.random.default_rng(j + 77_000_001)
    doc = int(rng.integers(n_docs))
    words = text(doc).rstrip(".").lower().split()
    picked = rng.choice(len(words), 10, replace=False)
    return " ".join(words[k] for k in picked), doc


def queries(n: int, n_docs: int) -> list[str]:
    return [query(j, n_docs)[0] for j in range(n)]


def embeddings(
    n: int, encode: Callable[[list[str]], np.ndarray] | None = None, *, cache_dir: Path = CACHE_DIR
) -> np.ndarray:
    """(n, 384) float32 real embeddings of texts(n), from the shard cache; missing shards are embedded."""
    if n < SHARD and not (cache_dir / f"corpus-{VERSION}-shard0000.npy").is_file():
        return _encode_batched(encode or _default_encoder(), texts(n))  # a quick run: not worth a shard
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for shard in range((n + SHARD - 1) // SHARD):
        path = cache_dir / f"corpus-{VERSION}-shard{shard:04d}.npy"
        if not path.is_file():
            encode = encode or _default_encoder()
            started = time.perf_counter()
            vecs = _encode_batched(encode, texts(SHARD, start=shard * SHARD))
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vecs)
            tmp.rename(path)
            log.info("bench.corpus_shard shard=%d s=%.0f", shard, time.perf_counter() - started)
        parts.append(np.load(path, mmap_mode="r"))
    return np.ascontiguousarray(np.concatenate(parts)[:n], dtype=np.float32)


def cached_docs(cache_dir: Path = CACHE_DIR) -> int:
    """How many documents are embedded in the cache (contiguous shards from 0)."""
    n = 0
    while (cache_dir / f"corpus-{VERSION}-shard{n // SHARD:04d}.npy").is_file():
        n += SHARD
    return n


def derived_vectors(real: np.ndarray, n: int, *, noise: float = 0.48, seed: int = 0) -> np.ndarray:
    """n vectors from `real`: row i is copy i // len(real) of parent i % len(real) (copy 0 is the parent)."""
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    rng = np.random.default_rng(seed)
    base = len(real)
    for start in range(0, n, base):
        stop = min(n, start + base)
        parents = real[: stop - start]
        if start == 0:
            out[start:stop] = parents
            continue
        jitter = rng.standard_normal(parents.shape, dtype=np.float32) * (noise / np.sqrt(real.shape[1]))
        block = parents + jitter
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def derived_text(i: int, base: int) -> str:
    parent, copy = i % base, i // base
    return text(parent) if copy == 0 else f"{text(parent)} (variant {copy})"


def _default_encoder() -> Callable[[list[str]], np.ndarray]:
    from kfresh.core.config import KfreshConfig
    from kfresh.indexer.embedding.embedder import create_embedder

    return create_embedder(KfreshConfig()).encode


def _encode_batched(encode: Callable[[list[str]], np.ndarray], items: list[str], batch: int = 256) -> np.ndarray:
    from tqdm import tqdm

    out = [
        encode(items[i : i + batch])
        for i in tqdm(range(0, len(items), batch), desc="embed corpus", unit="batch", leave=False)
    ]
    return np.concatenate(out).astype(np.float32)


if __name__ == "__main__":  # `python -m kfresh.benchmarks.corpus 100000`: fill the cache ahead of a run
    import sys

    logging.basicConfig(level=logging.INFO)
    print(embeddings(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000).shape)
