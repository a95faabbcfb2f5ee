"""Snapshots are atomic and verified; a damaged one is detected and the index rebuilt from the store."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from indexer_helper import CountingEmbedder

from kfresh.core.config import IndexConfig, KfreshConfig
from kfresh.indexer.docmap import DocMap
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer
from kfresh.indexer.snapshot import (
    SnapshotData,
    SnapshotError,
    load_snapshot,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)
from kfresh.indexer.vectors.base import StreamedPart
from kfresh.indexer.vectors.flat import FlatIndex

DIM = 16
CFG = IndexConfig(kind="flat")


@pytest.fixture(scope="module")
def embedder(embedder_path):
    """The real packaged all-MiniLM-L6-v2 (path from conftest's session fixture), loaded once per module."""
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


def sample(seed: int = 0, n: int = 50) -> tuple[FlatIndex, DocMap, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    index, docmap = FlatIndex(DIM), DocMap()
    index.add(ids, v)
    for d in range(0, n, 5):
        docmap.set(f"doc-{d}", 1 + d % 3, ids[d : d + 5])
    return index, docmap, v


def data(index: FlatIndex, docmap: DocMap, seq: int = 42, embedder: str = "m") -> SnapshotData:
    return SnapshotData("flat", DIM, embedder, seq, index.to_bytes(), docmap.to_bytes())


def test_roundtrip(tmp_path):
    index, docmap, v = sample()
    path = write_snapshot(tmp_path, data(index, docmap))
    assert path == snapshot_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.snap"]  # no temp file left behind
    snap = load_snapshot(tmp_path, CFG, dim=DIM, embedder="m")
    assert snap is not None and snap.applied_seq == 42
    assert np.array_equal(snap.index.search(v[:5], 3)[1], index.search(v[:5], 3)[1])
    assert list(snap.docmap) == list(docmap)
    assert all(snap.docmap.version(d) == docmap.version(d) for d in docmap)
    assert all(np.array_equal(snap.docmap.ids(d), docmap.ids(d)) for d in docmap)


def test_failed_write_keeps_the_previous_snapshot(tmp_path, monkeypatch):
    index, docmap, _ = sample()
    write_snapshot(tmp_path, data(index, docmap, seq=1))
    before = snapshot_path(tmp_path).read_bytes()

    def crash(*_a, **_k):  # fault injection: the process dies between fsync and rename
        raise OSError("injected crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    index.add(np.array([999]), np.ones((1, DIM), dtype=np.float32) / 4)
    with pytest.raises(OSError):
        write_snapshot(tmp_path, data(index, docmap, seq=2))
    monkeypatch.undo()
    assert snapshot_path(tmp_path).read_bytes() == before
    assert load_snapshot(tmp_path, CFG, dim=DIM, embedder="m").applied_seq == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_snapshot_is_detected(tmp_path, caplog, damage):
    index, docmap, _ = sample()
    path = write_snapshot(tmp_path, data(index, docmap))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 3] ^= 0x40
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(os.urandom(len(raw)))
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError):
        read_snapshot(path)
    with caplog.at_level(logging.WARNING, logger="kfresh.indexer"):
        assert load_snapshot(tmp_path, CFG, dim=DIM, embedder="m") is None
    assert "snapshot.unusable" in caplog.text


def test_snapshot_for_another_configuration_is_not_used(tmp_path):
    index, docmap, _ = sample()
    write_snapshot(tmp_path, data(index, docmap))
    assert load_snapshot(tmp_path, CFG, dim=DIM, embedder="other-model") is None
    assert load_snapshot(tmp_path, IndexConfig(kind="ivf"), dim=DIM, embedder="m") is None
    assert load_snapshot(tmp_path / "missing", CFG, dim=DIM, embedder="m") is None


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_indexer_rebuilds_from_stored_embeddings_when_the_snapshot_is_damaged(tmp_path, embedder, caplog, damage):
    cfg = KfreshConfig().with_home(tmp_path)
    texts = {
        f"s{i}": f"Snapshot test fact {i}: the {i}th moon of Tarsis is made of {['ice', 'rock', 'glass'][i % 3]}."
        for i in range(6)
    }
    with Indexer(cfg, embedder=embedder) as ix:
        acks = [ix.upsert(DocumentIn(d, t)) for d, t in texts.items()]
        assert all(ix.wait_until_indexed(a.id, a.version, 30) for a in acks)
    path = snapshot_path(cfg.index.snapshot_dir)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        del raw[len(raw) - 100 :]
    else:
        raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))

    counting = CountingEmbedder(embedder)
    with caplog.at_level(logging.WARNING, logger="kfresh.indexer"), Indexer(cfg, embedder=counting) as ix:
        assert "snapshot.unusable" in caplog.text
        assert ix.stats().indexed_vectors == len(texts)
        for doc_id, text in texts.items():
            assert ix.search(text, 1)[0].doc_id == doc_id
        assert counting.worker_encoded == []  # rebuilt from stored vectors: nothing re-embedded
    assert load_snapshot(cfg.index.snapshot_dir, cfg.index, dim=embedder.dim, embedder=embedder.name) is not None


@pytest.mark.parametrize("kind", ["flat", "ivf-flat-phase", "ivf", "torch"])
def test_snapshot_later_is_the_index_at_capture_time(kind: str) -> None:
    from kfresh.indexer.vectors.ivf import IvfIndex
    from kfresh.indexer.vectors.torch_exact import TorchIndex

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((600, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    if kind == "flat":
        index = FlatIndex(DIM)
    elif kind == "torch":
        index = TorchIndex(DIM, device="cpu")
    else:
        index = IvfIndex(DIM, nlist=4, nprobe=4, train_min=100 if kind == "ivf" else 10_000)
    index.add(np.arange(500), vecs[:500])
    while index.needs_maintenance():  # train the IVF index (the worker does this between batches)
        index.apply_maintenance(index.prepare_maintenance())
    expected = index.to_bytes()
    later = index.snapshot_later()
    index.add(np.arange(500, 600), vecs[500:])  # the worker keeps mutating after the capture
    index.remove(np.arange(0, 50))
    assert joined(later()) == expected


def joined(parts: tuple) -> bytes:
    """The bytes of snapshot parts: buffers as they are, streamed parts (faiss.write_index) collected."""
    out: list[bytes] = []
    for part in parts:
        if isinstance(part, StreamedPart):
            pieces: list[bytes] = []
            part.write(pieces.append)
            out.append(b"".join(pieces))
            assert len(out[-1]) == part.nbytes
        else:
            out.append(bytes(part))
    return b"".join(out)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_streamed_index_snapshot_round_trips_through_the_file(tmp_path, kind: str) -> None:
    from kfresh.indexer.vectors.ivf import IvfIndex

    index, docmap, v = sample(n=400)
    if kind == "ivf":
        ivf = IvfIndex(DIM, nlist=4, nprobe=4, train_min=100)
        ivf.add(*index.export())
        while ivf.needs_maintenance():
            ivf.apply_maintenance(ivf.prepare_maintenance())
        index = ivf  # type: ignore[assignment]
    cfg = IndexConfig(kind=kind, ivf_nlist=4, ivf_nprobe=4, ivf_train_min=100)
    write_snapshot(tmp_path, SnapshotData(kind, DIM, "m", 7, index.snapshot_later(), docmap.to_bytes()))
    header, body, _ = read_snapshot(snapshot_path(tmp_path))
    assert header["index_len"] == len(body) and bytes(body) == index.to_bytes()
    snap = load_snapshot(tmp_path, cfg, dim=DIM, embedder="m")
    assert snap is not None and np.array_equal(snap.index.search(v[:5], 3)[1], index.search(v[:5], 3)[1])


def test_a_streamed_part_that_breaks_its_length_fails_and_keeps_the_previous_snapshot(tmp_path) -> None:
    index, docmap, _ = sample()
    write_snapshot(tmp_path, data(index, docmap, seq=1))

    class Short:
        nbytes = 100

        def write(self, sink) -> None:
            sink(b"x" * 60)

    with pytest.raises(SnapshotError, match="expected 100"):
        write_snapshot(tmp_path, SnapshotData("flat", DIM, "m", 2, lambda: (Short(),), docmap.to_bytes()))
    snap = load_snapshot(tmp_path, CFG, dim=DIM, embedder="m")
    assert snap is not None and snap.applied_seq == 1


def test_docmap_snapshot_later_is_the_map_at_capture_time(monkeypatch, tmp_path) -> None:
    from kfresh.indexer import docmap as docmap_module

    monkeypatch.setattr(docmap_module, "_CHUNK", 7)  # several encoding steps
    docmap = DocMap()
    for d in range(30):
        docmap.set(f"dok-ü-{d}", 1 + d % 4, np.arange(d % 3) + 100 * d)  # some documents have no chunks
    expected = {d: (docmap.version(d), docmap.ids(d).tolist()) for d in docmap}
    later = docmap.snapshot_later()
    docmap.set("dok-ü-3", 9, np.array([7, 8]))  # the worker keeps mutating after the capture
    docmap.pop("dok-ü-4")
    docmap.set("new", 1, np.array([1]))
    index = FlatIndex(DIM)
    index.add(
        np.array([100 * d + i for d in range(30) for i in range(d % 3)]),
        np.ones((sum(d % 3 for d in range(30)), DIM), np.float32),
    )
    write_snapshot(tmp_path, SnapshotData("flat", DIM, "m", 5, index.to_bytes(), later))
    loaded = load_snapshot(tmp_path, CFG, dim=DIM, embedder="m")
    assert loaded is not None
    assert {d: (loaded.docmap.version(d), loaded.docmap.ids(d).tolist()) for d in loaded.docmap} == expected


@pytest.mark.parametrize(
    ("every", "fraction", "ntotal", "threshold"),
    [(5_000, 0.1, 100_000, 10_000), (5_000, 0.1, 20_000, 5_000), (40, 0.0, 10**6, 40)],
)
def test_snapshot_threshold_grows_with_the_index(every: int, fraction: float, ntotal: int, threshold: int) -> None:
    from types import SimpleNamespace

    from kfresh.indexer.worker import Worker

    cfg = KfreshConfig()
    cfg.index.snapshot_every_changes, cfg.index.snapshot_every_fraction = every, fraction
    worker = SimpleNamespace(cfg=cfg, state=SimpleNamespace(docmap=SimpleNamespace(total_ids=ntotal)))
    assert Worker._snapshot_threshold(worker) == threshold  # type: ignore[arg-type]
