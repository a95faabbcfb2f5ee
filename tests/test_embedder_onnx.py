"""The onnxruntime embedder: exported once, the same vectors as sentence-transformers, int8 a named other space."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from kfresh.core.config import KfreshConfig, ModelsConfig
from kfresh.core.errors import Unavailable
from kfresh.indexer.embedding import onnx_export
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder, create_embedder, resolve_backend
from kfresh.indexer.embedding.onnx_embedder import INT8_SUFFIX, OnnxEmbedder, split_parts

TEXTS = [
    "What is the capital of Freedonia?",
    "x",
    "The Zorblat reactor on Kepler station was rebuilt in 2031 after the coolant leak. " * 40,  # > 256 tokens
    "",
    "Mixed lengths make the batches pad: short, then long, then short again.",
    "Ünïcödé text, numbers 12345 and punctuation!?",
]


@pytest.fixture(scope="module")
def onnx_dir(models_config: ModelsConfig, embedder_path: str) -> Path:
    return onnx_export.onnx_folder(embedder_path, models_config.cache_dir)


@pytest.fixture(scope="module")
def torch_embedder(embedder_path: str) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(embedder_path, device="cpu", name="packaged:all-MiniLM-L6-v2")


def test_onnx_vectors_match_sentence_transformers(onnx_dir: Path, torch_embedder: SentenceTransformerEmbedder) -> None:
    onnx = OnnxEmbedder(onnx_dir, name=torch_embedder.name, batch_size=2)  # small batches: sorting + restoring order
    a, b = onnx.encode(TEXTS), torch_embedder.encode(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.9999  # the same vector space: stored torch vectors stay valid
    assert onnx.name == torch_embedder.name
    assert onnx.encode([]).shape == (0, 384)
    # A text alone gets the same vector as inside a padded batch.
    np.testing.assert_allclose(onnx.encode([TEXTS[1]])[0], a[1], atol=1e-5)


def test_int8_is_a_differently_named_nearby_space(onnx_dir: Path, torch_embedder: SentenceTransformerEmbedder) -> None:
    int8 = OnnxEmbedder(onnx_dir, name=torch_embedder.name, quantized=True)
    assert int8.name == torch_embedder.name + INT8_SUFFIX  # switching re-embeds the stored vectors
    cos = (int8.encode(TEXTS) * torch_embedder.encode(TEXTS)).sum(1)
    assert cos.min() > 0.8 and cos.max() < 0.9999


def test_concurrent_encodes_share_one_session(onnx_dir: Path) -> None:
    onnx = OnnxEmbedder(onnx_dir, name="m")
    expected = onnx.encode(TEXTS)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(5):
                results.append(onnx.encode(TEXTS))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_export_is_cached_and_redone_when_stale(onnx_dir: Path, models_config: ModelsConfig, embedder_path: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    marker = json.loads((onnx_dir / onnx_export.MARKER).read_text())
    assert marker["dim"] == 384 and marker["max_seq_length"] == 256 and len(marker["source_sha256"]) == 64

    def must_not_export(*_: object) -> None:
        raise AssertionError("a current export was redone")

    monkeypatch.setattr(onnx_export, "export", must_not_export)
    assert onnx_export.onnx_folder(embedder_path, models_config.cache_dir) == onnx_dir
    monkeypatch.setattr(onnx_export, "EXPORT_VERSION", onnx_export.EXPORT_VERSION + 1)
    with pytest.raises(AssertionError, match="redone"):
        onnx_export.onnx_folder(embedder_path, models_config.cache_dir)


def test_unsupported_models_say_to_use_torch(embedder_path: str, tmp_path: Path) -> None:
    src = tmp_path / "cls-model"
    shutil.copytree(embedder_path, src)
    cfg = src / "1_Pooling" / "config.json"
    pooling = json.loads(cfg.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    cfg.write_text(json.dumps(pooling))
    with pytest.raises(onnx_export.ExportError, match="backend=torch"):
        onnx_export.onnx_folder(src, tmp_path / "cache")
    cache = tmp_path / "cache" / "onnx"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]  # no half-written export left


def test_factory_picks_the_backend(models_config: ModelsConfig, embedder_path: str) -> None:
    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    cfg = KfreshConfig(models=models_config, embedder={"backend": "onnx"})
    assert isinstance(create_embedder(cfg), OnnxEmbedder)
    with pytest.raises(Unavailable, match="backend=torch"):
        create_embedder(KfreshConfig(models=models_config, embedder={"backend": "onnx", "device": "cuda"}))


def test_split_parts_fills_every_lane_within_the_batch_size() -> None:
    order = np.arange(100)
    assert [len(p) for p in split_parts(order[:32], 32, 2)] == [16, 16]  # one worker batch: both lanes busy
    assert [len(p) for p in split_parts(order, 32, 2)] == [25, 25, 25, 25]  # never above the batch size
    assert [len(p) for p in split_parts(order[:1], 32, 4)] == [1]  # a query: one part, no empty ones
    assert [len(p) for p in split_parts(order[:3], 32, 4)] == [1, 1, 1]
    assert np.array_equal(np.concatenate(split_parts(order, 7, 3)), order)  # contiguous, in the sorted order


def test_lanes_give_the_same_vectors_as_one_lane(onnx_dir: Path) -> None:
    texts = [f"{t} number {i}" for i in range(12) for t in TEXTS]  # 72 texts of mixed lengths: several parts
    one = OnnxEmbedder(onnx_dir, name="m", threads=1, batch_size=8)
    lanes = OnnxEmbedder(onnx_dir, name="m", threads=3, batch_size=8)
    assert one.lanes == 1 and lanes.lanes == 3
    np.testing.assert_allclose(lanes.encode(texts), one.encode(texts), atol=1e-5)


def test_a_failing_lane_fails_the_encode_and_the_next_encode_works(
    onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = OnnxEmbedder(onnx_dir, name="m", threads=2, batch_size=4)
    expected = onnx.encode(TEXTS * 4)
    real, calls = onnx._infer, []

    def flaky(encodings: object, idx: np.ndarray) -> np.ndarray:
        calls.append(len(idx))
        if len(calls) == 2:
            raise RuntimeError("lane broke")
        return real(encodings, idx)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx, "_infer", flaky)
    with pytest.raises(RuntimeError, match="lane broke"):
        onnx.encode(TEXTS * 4)
    assert len(calls) < 6  # the other lane stopped taking parts
    monkeypatch.setattr(onnx, "_infer", real)
    np.testing.assert_allclose(onnx.encode(TEXTS * 4), expected, atol=1e-5)


def test_a_query_never_waits_for_busy_lanes(onnx_dir: Path) -> None:
    onnx = OnnxEmbedder(onnx_dir, name="m", threads=2)
    release = threading.Event()
    blocker = onnx._lane_pool().submit(release.wait, 30)  # every helper lane busy (e.g. the worker's batch)
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (onnx.encode(["what changed today?"]), done.set()), daemon=True).start()
        assert done.wait(10), "a one-text encode queued behind the lanes"
    finally:
        release.set()
        blocker.result()
