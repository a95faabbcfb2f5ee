"""Which chunk ids of which document version are in the vector index: what the worker swaps out."""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np


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
        names = list(self._docs)
        versions = [self._docs[d][0] for d in names]
        counts = [len(self._docs[d][1]) for d in names]
        head = json.dumps({"docs": names, "versions": versions, "counts": counts}, ensure_ascii=False).encode("utf-8")
        ids = np.concatenate([self._docs[d][1] for d in names]) if names else np.zeros(0, dtype=np.int64)
        return struct.pack("<Q", len(head)) + head + ids.astype("<i8").tobytes()

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
