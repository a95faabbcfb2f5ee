"""Atomic, checksummed snapshots of the vector index, so a restart does not re-add every stored vector.

File layout: MAGIC, u64 header length, header JSON, index bytes, document-map bytes, sha256 of all of it.
Written to a temp file, fsynced, os.replace'd over the old one, then the folder is fsynced: a crash
leaves either the old or the new snapshot, never a torn one. A snapshot that fails its checksum or does
not match the running configuration is reported and ignored; the caller rebuilds from the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kfresh.core.config import IndexConfig
from kfresh.core.files import fsync_dir
from kfresh.indexer.docmap import DocMap
from kfresh.indexer.vectors import VectorIndex, index_from_bytes
from kfresh.indexer.vectors.base import SnapshotParts, StreamedPart

log = logging.getLogger("kfresh.indexer")

MAGIC = b"KFSNAP1\n"
FILENAME = "index.snap"
_DIGEST = 32
_FLUSH_EVERY = 8 << 20  # bytes written between fdatasyncs of a large snapshot


@dataclass(frozen=True)
class SnapshotData:
    """What a snapshot holds, as bytes (captured under the index lock, written outside it)."""

    kind: str
    dim: int
    embedder: str
    applied_seq: int
    index_bytes: (
        bytes | Callable[[], SnapshotParts]
    )  # a callable serialises on the writer's thread (VectorIndex.snapshot_later)
    map_bytes: bytes | Callable[[], bytes]  # likewise (DocMap.snapshot_later)


@dataclass
class Snapshot:
    index: VectorIndex
    docmap: DocMap
    applied_seq: int


class SnapshotError(ValueError):
    """The snapshot file is truncated, corrupt or was made for another configuration."""


def snapshot_path(folder: Path) -> Path:
    return Path(folder) / FILENAME


def write_snapshot(folder: Path, data: SnapshotData) -> Path:
    """Atomically replace the snapshot in `folder`; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = data.index_bytes() if callable(data.index_bytes) else (data.index_bytes,)
    index_parts = [part if isinstance(part, StreamedPart) else memoryview(part).cast("B") for part in index]
    map_bytes = data.map_bytes() if callable(data.map_bytes) else data.map_bytes
    header = json.dumps(
        {
            "kind": data.kind,
            "dim": data.dim,
            "embedder": data.embedder,
            "applied_seq": data.applied_seq,
            "index_len": sum(p.nbytes for p in index_parts),
            "map_len": len(map_bytes),
            "created_at": time.time(),
        }
    ).encode("utf-8")
    final = snapshot_path(folder)
    tmp = final.with_name(f"{FILENAME}.tmp-{os.getpid()}")
    started = time.perf_counter()
    with open(tmp, "wb") as f:
        out = _HashingWriter(f)
        for part in (MAGIC, struct.pack("<Q", len(header)), header, *index_parts, map_bytes):
            if isinstance(part, StreamedPart):
                before = out.written
                part.write(out.write)
                if out.written - before != part.nbytes:  # the header already promised nbytes
                    raise SnapshotError(f"index part wrote {out.written - before} bytes, expected {part.nbytes}")
            else:
                out.write(part)
        f.write(out.digest.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(folder)
    log.info(
        "snapshot.written path=%s applied_seq=%d bytes=%d ms=%.1f",
        final,
        data.applied_seq,
        final.stat().st_size,
        (time.perf_counter() - started) * 1000,
    )
    return final


class _HashingWriter:
    """Writes and hashes pieces; fdatasyncs every _FLUSH_EVERY bytes, so the store's small fsyncs never queue
    behind one huge flush of a snapshot."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.written = 0
        self._unsynced = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), _FLUSH_EVERY):
            piece = view[at : at + _FLUSH_EVERY]
            self.digest.update(piece)
            self.f.write(piece)
            self.written += len(piece)
            self._unsynced += len(piece)
            if self._unsynced >= _FLUSH_EVERY:
                self.f.flush()
                os.fdatasync(self.f.fileno())
                self._unsynced = 0


def read_snapshot(path: Path) -> tuple[dict, memoryview, memoryview]:
    """(header, index bytes, map bytes) after verifying the checksum; SnapshotError if damaged."""
    raw = Path(path).read_bytes()
    if len(raw) < len(MAGIC) + 8 + _DIGEST or not raw.startswith(MAGIC):
        raise SnapshotError("truncated or not a kfresh snapshot")
    view = memoryview(raw)  # slices of a view do not copy gigabytes of vectors
    body, digest = view[:-_DIGEST], view[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("checksum mismatch (truncated or corrupt)")
    (hlen,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(bytes(body[start : start + hlen]).decode("utf-8"))
    start += hlen
    ilen, mlen = header["index_len"], header["map_len"]
    if start + ilen + mlen != len(body):
        raise SnapshotError("section lengths do not match the file")
    return header, body[start : start + ilen], body[start + ilen : start + ilen + mlen]


def load_snapshot(folder: Path, cfg: IndexConfig, *, dim: int, embedder: str) -> Snapshot | None:
    """The verified snapshot in `folder`, or None (missing, damaged or stale: the caller rebuilds)."""
    path = snapshot_path(folder)
    if not path.exists():
        return None
    started = time.perf_counter()
    index: VectorIndex | None = None
    try:
        header, index_bytes, map_bytes = read_snapshot(path)
        expected = {"kind": cfg.kind, "dim": dim, "embedder": embedder}
        found = {key: header.get(key) for key in expected}
        if found != expected:
            raise SnapshotError(f"made for {found}, running {expected}")
        index = index_from_bytes(cfg, dim, index_bytes)
        docmap = DocMap.from_bytes(map_bytes)
        if index.ntotal != docmap.total_ids:
            raise SnapshotError(f"index holds {index.ntotal} vectors but the map names {docmap.total_ids}")
    except (SnapshotError, ValueError, KeyError, RuntimeError, struct.error, UnicodeDecodeError) as exc:
        log.warning("snapshot.unusable path=%s reason=%s: rebuilding from stored embeddings", path, exc)
        if index is not None:
            index.close()  # a milvus index holds a connection
        return None
    log.info(
        "snapshot.loaded path=%s applied_seq=%d vectors=%d ms=%.1f",
        path,
        header["applied_seq"],
        index.ntotal,
        (time.perf_counter() - started) * 1000,
    )
    return Snapshot(index=index, docmap=docmap, applied_seq=int(header["applied_seq"]))


class SnapshotWriter:
    """Writes snapshots on its own thread so the worker only pays for capturing the bytes."""

    def __init__(self, folder: Path) -> None:
        import threading

        self.folder = Path(folder)
        self.failures = 0
        self._cond = threading.Condition()
        self._next: SnapshotData | None = None
        self._busy = False
        self._closed = False
        self.written_seq = -1  # applied_seq of the newest snapshot written
        self._thread = threading.Thread(target=self._run, name="kfresh-snapshot", daemon=True)
        self._thread.start()

    def submit(self, data: SnapshotData) -> None:
        """Queue `data`; a newer submission replaces one not yet written."""
        with self._cond:
            self._next = data
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._next is None and not self._busy, timeout_s)

    def wait_written(self, seq: int, timeout_s: float) -> bool:
        """True once a snapshot whose applied_seq >= `seq` is on disk; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.written_seq >= seq, timeout_s)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None or self._closed)
                if self._next is None:
                    return
                data, self._next, self._busy = self._next, None, True
            try:
                write_snapshot(self.folder, data)
                with self._cond:
                    self.written_seq = max(self.written_seq, data.applied_seq)
            except Exception:  # a failed snapshot only costs a longer restart; keep serving
                self.failures += 1
                log.exception("snapshot.write_failed folder=%s", self.folder)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _lower_priority() -> None:
    """Serialising, hashing and writing hundreds of MB is background work: on Linux a thread has its own nice
    value, so this one (nice 19) yields the cores to the indexing worker and the gRPC threads. Not SCHED_IDLE:
    a thread that may hold the GIL must never be starved outright."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
