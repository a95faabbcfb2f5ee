"""Which chunk ids of which document version are in the vector index: what the worker swaps out."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator

import numpy as np

_CHUNK = 8192  # documents encoded per step: each step is short, so other threads get the GIL in between


def _encode(docs: dict[str, tuple[int, np.ndarray]]) -> bytes:
    """u64 header length, JSON {"docs", "versions", "counts"}, then every document's ids as little-endian int64."""
    names = list(docs)
    heads: tuple[list[str], list[str], list[str]] = ([], [], [])
    ids: list[bytes] = []
    for at in range(0, len(names), _CHUNK):
        part = names[at : at + _CHUNK]
        entries = [docs[d] for d in part]
        heads[0].append(json.dumps(part, ensure_ascii=False)[1:-1])
        heads[1].append(json.dumps([e[0] for e in entries])[1:-1])
        heads[2].append(json.dumps([len(e[1]) for e in entries])[1:-1])
        ids.append(np.concatenate([e[1] for e in entries]).astype("<i8").tobytes())
    lists = [f'"{key}": [' + ", ".join(parts) + "]" for key, parts in zip(("docs", "versions", "counts"), heads)]
    head = ("{" + ", ".join(lists) + "}").encode("utf-8")
    return struct.pack("<Q", len(head)) + head + b"".join(ids)


class DocMap:
    """doc_id -> (indexed version, int64 chunk ids). Mutated only by the worker, under the index lock."""

    def __init__(self) -> None:
        self._docs: dict[str, tuple[int, np.ndarray]] = {}
        self._nids = 0

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._docs

    def __iter__(self) -> Iterator[str]:
        return iter(self._docs)

    @property
    def total_ids(self) -> int:
        return self._nids

    def version(self, doc_id: str) -> int:
        entry = self._docs.get(doc_id)
        return entry[0] if entry else 0

    def ids(self, doc_id: str) -> np.ndarray:
        entry = self._docs.get(doc_id)
        return entry[1] if entry else np.zeros(0, dtype=np.int64)

    def set(self, doc_id: str, version: int, ids: np.ndarray) -> None:
        self.pop(doc_id)
        arr = np.asarray(ids, dtype=np.int64).copy()
        self._docs[doc_id] = (version, arr)
        self._nids += len(arr)

    def pop(self, doc_id: str) -> np.ndarray:
        entry = self._docs.pop(doc_id, None)
        if entry is None:
            return np.zeros(0, dtype=np.int64)
        self._nids -= len(entry[1])
        return entry[1]

    def to_bytes(self) -> bytes:
        return _encode(self._docs)

    def snapshot_later(self) -> Callable[[], bytes]:
        """to_bytes() in two halves: a shallow copy now (~3 ms at 100k documents; the id arrays are never
        mutated in place, so it is a consistent picture) and the encoding later, on the snapshot thread."""
        docs = dict(self._docs)
        return lambda: _encode(docs)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> DocMap:
        (n,) = struct.unpack_from("<Q", data, 0)
        head = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
        ids = np.frombuffer(data[8 + n :], dtype="<i8").astype(np.int64)
        counts = head["counts"]
        if sum(counts) != len(ids) or not (len(head["docs"]) == len(head["versions"]) == len(counts)):
            raise ValueError("document map is inconsistent")
        out = cls()
        offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        for i, (doc, version) in enumerate(zip(head["docs"], head["versions"])):
            out.set(doc, int(version), ids[offsets[i] : offsets[i + 1]])
        return out
