"""Which indexed documents carry which metadata values: the inverted index a filter is planned on.

A filter used to be applied after the vector search (ask for 4x k candidates, widen up to a cap, keep what
matches), so a selective filter over a large index silently returned fewer than k results, or none. With
this map a filter becomes the exact set of matching documents first; the search then scores only their
chunks (`search.py` plans how). It mirrors the DocMap: mutated only by the worker under the index write
lock, rebuilt from the store at start (the store holds every indexed version's attributes), never snapshotted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import DocAttrs


class MetaIndex:
    """doc_id -> attributes of its indexed version, and (key, value) -> doc_ids holding that metadata pair."""

    def __init__(self) -> None:
        self._docs: dict[str, DocAttrs] = {}
        self._postings: dict[tuple[str, str], set[str]] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def put(self, doc_id: str, attrs: DocAttrs) -> None:
        self.pop(doc_id)
        self._docs[doc_id] = attrs
        for pair in attrs.metadata.items():
            self._postings.setdefault(pair, set()).add(doc_id)

    def pop(self, doc_id: str) -> None:
        attrs = self._docs.pop(doc_id, None)
        for pair in (attrs.metadata if attrs else {}).items():
            holders = self._postings.get(pair)
            if holders is not None:
                holders.discard(doc_id)
                if not holders:
                    del self._postings[pair]

    def matching(self, f: Filter | Mapping[str, str]) -> set[str]:
        """The documents `f` selects (all documents for an empty filter). Metadata conditions come from the
        postings; source globs and the valid_from range are checked on those candidates (all documents when
        the filter has no metadata condition)."""
        if not isinstance(f, Filter):
            f = Filter(equals=dict(f))
        sets = [self._postings.get(pair, set()) for pair in f.equals.items()]
        for key, values in f.any_of.items():
            sets.append(set().union(*(self._postings.get((key, v), set()) for v in values)))
        if len(sets) == 1:
            found = set(sets[0])
        elif sets:
            smallest = min(sets, key=len)
            found = {d for d in smallest if all(d in s for s in sets)}
        else:
            found = set(self._docs)
        if f.sources or f.has_range:
            found = {
                d for d in found if f.matches(self._docs[d].metadata, self._docs[d].source, self._docs[d].valid_from)
            }
        return found

    def estimate(self, f: Filter) -> int:
        """An upper bound of len(matching(f)) from the postings' sizes alone (no set is built): the smallest
        equality's posting, or IN list's postings together; every document when neither is asked."""
        sizes = [len(self._postings.get(pair, ())) for pair in f.equals.items()]
        sizes += [sum(len(self._postings.get((key, v), ())) for v in values) for key, values in f.any_of.items()]
        return min(sizes, default=len(self._docs))

    @classmethod
    def of(cls, entries: Iterable[tuple[str, DocAttrs]]) -> MetaIndex:
        out = cls()
        for doc_id, attrs in entries:
            out.put(doc_id, attrs)
        return out
