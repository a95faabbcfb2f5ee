"""Which indexed documents carry which metadata values: the inverted index a filter is planned on.

A filter used to be applied after the vector search (ask for 4x k candidates, widen up to a cap, keep what
matches), so a selective filter over a large index silently returned fewer than k results, or none. With
this map a filter becomes the exact set of matching chunk ids first; the search then scores only those
(`search.py` plans how). It mirrors the DocMap: mutated only by the worker under the index write lock,
rebuilt from the store at start (the store holds every indexed version's attributes), never snapshotted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class MetaIndex:
    """doc_id -> metadata of its indexed version, and (key, value) -> doc_ids holding it."""

    def __init__(self) -> None:
        self._docs: dict[str, dict[str, str]] = {}
        self._postings: dict[tuple[str, str], set[str]] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def put(self, doc_id: str, metadata: Mapping[str, str]) -> None:
        self.pop(doc_id)
        attrs = dict(metadata)
        self._docs[doc_id] = attrs
        for pair in attrs.items():
            self._postings.setdefault(pair, set()).add(doc_id)

    def pop(self, doc_id: str) -> None:
        attrs = self._docs.pop(doc_id, None)
        for pair in (attrs or {}).items():
            holders = self._postings.get(pair)
            if holders is not None:
                holders.discard(doc_id)
                if not holders:
                    del self._postings[pair]

    def matching(self, filters: Mapping[str, str]) -> set[str]:
        """The documents whose metadata holds every pair of `filters` (all documents for an empty filter)."""
        if not filters:
            return set(self._docs)
        sets = [self._postings.get(pair, set()) for pair in filters.items()]
        smallest = min(sets, key=len)
        return {d for d in smallest if all(d in s for s in sets)}

    def metadata(self, doc_id: str) -> dict[str, str] | None:
        return self._docs.get(doc_id)

    @classmethod
    def of(cls, entries: Iterable[tuple[str, Mapping[str, str]]]) -> MetaIndex:
        out = cls()
        for doc_id, metadata in entries:
            out.put(doc_id, metadata)
        return out
