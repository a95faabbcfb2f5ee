"""Which indexed documents carry which metadata values: the inverted index a filter is planned on.

A filter used to be applied after the vector search (ask for 4x k candidates, widen up to a cap, keep what
matches), so a selective filter over a large index silently returned fewer than k results, or none. With
this map a filter becomes the exact set of matching documents first; the search then scores only their
chunks (`search.py` plans how). It mirrors the DocMap: mutated only by the worker under the index write
lock, rebuilt from the store at start (the store holds every indexed version's attributes), never snapshotted.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

import numpy as np

from kfresh.indexer.filters import Filter
from kfresh.indexer.rows import DocAttrs

K = TypeVar("K", bound=Hashable)


class MetaIndex:
    """doc_id -> attributes of its indexed version; (key, value) -> doc_ids holding that metadata pair; source ->
    doc_ids from it; and, built on the first range filter after a change, the documents sorted by valid_from.

    So every kind of condition narrows by lookup: a source glob is matched once per distinct source (not per
    document), a valid_from range is a binary search, and only what is left is checked document by document.
    """

    def __init__(self) -> None:
        self._docs: dict[str, DocAttrs] = {}
        self._postings: dict[tuple[str, str], set[str]] = {}
        self._by_source: dict[str, set[str]] = {}
        self._by_time: tuple[np.ndarray, list[str]] | None = None  # (sorted valid_from, their doc ids)
        self._globbed: dict[tuple[str, ...], list[str]] = {}  # globs -> sources matched; dropped when sources change

    def __len__(self) -> int:
        return len(self._docs)

    def put(self, doc_id: str, attrs: DocAttrs) -> None:
        self.pop(doc_id)
        self._docs[doc_id] = attrs
        for pair in attrs.metadata.items():
            self._postings.setdefault(pair, set()).add(doc_id)
        if attrs.source not in self._by_source:
            self._globbed.clear()
        self._by_source.setdefault(attrs.source, set()).add(doc_id)
        self._by_time = None

    def pop(self, doc_id: str) -> None:
        attrs = self._docs.pop(doc_id, None)
        if attrs is None:
            return
        for pair in attrs.metadata.items():
            _discard(self._postings, pair, doc_id)
        _discard(self._by_source, attrs.source, doc_id)
        if attrs.source not in self._by_source:
            self._globbed.clear()
        self._by_time = None

    def matching(self, f: Filter | Mapping[str, str]) -> set[str]:
        """The documents `f` selects (all documents for an empty filter). The smallest condition names the
        candidates (a metadata posting, the documents of the sources the globs match, or the valid_from range
        by binary search); each candidate is then checked against the other conditions."""
        if not isinstance(f, Filter):
            f = Filter(equals=dict(f))
        if not f:
            return set(self._docs)
        postings = self._posting_sets(f)
        sources = set(self._sources_matching(f.sources)) if f.sources else None
        span = self._time_span(f) if f.has_range else None
        smallest = min(postings, key=len) if postings else None
        candidates: Iterable[str] = smallest if smallest is not None else ()
        size = len(smallest) if smallest is not None else math.inf
        if sources is not None and (n := sum(len(self._by_source[s]) for s in sources)) < size:
            candidates, size = _union(self._by_source, sources), n
        if span is not None and span[1] - span[0] < size:
            candidates = self._sorted_by_time()[1][span[0] : span[1]]
        docs = self._docs
        return {
            d
            for d in candidates
            if all(d in p for p in postings)
            and (sources is None or docs[d].source in sources)
            and (span is None or f.in_range(docs[d].valid_from))
        }

    def estimate(self, f: Filter) -> int:
        """An upper bound of len(matching(f)) without intersecting anything: the smallest condition's size; every
        document when there is no condition."""
        sizes = [len(self._postings.get(pair, ())) for pair in f.equals.items()]
        sizes += [sum(len(self._postings.get((key, v), ())) for v in values) for key, values in f.any_of.items()]
        if f.sources:
            sizes.append(sum(len(self._by_source[s]) for s in self._sources_matching(f.sources)))
        if f.has_range:
            low, high = self._time_span(f)
            sizes.append(high - low)
        return min(sizes, default=len(self._docs))

    def _posting_sets(self, f: Filter) -> list[set[str]]:
        sets = [self._postings.get(pair, set()) for pair in f.equals.items()]
        for key, values in f.any_of.items():
            sets.append(_union(self._postings, [(key, v) for v in values]))
        return sets

    def _sources_matching(self, globs: tuple[str, ...]) -> list[str]:
        """The sources any of `globs` matches, remembered until a source appears or goes: a filtered search asks
        twice (`estimate`, then `matching`), and a corpus of many distinct sources makes each ask cost."""
        found = self._globbed.get(globs)
        if found is None:
            found = self._globbed[globs] = [s for s in self._by_source if any(fnmatch.fnmatchcase(s, g) for g in globs)]
        return found

    def _sorted_by_time(self) -> tuple[np.ndarray, list[str]]:
        """Built on demand (under the read lock: no writer runs meanwhile) and dropped by any change."""
        if self._by_time is None:
            ids = list(self._docs)
            times = np.fromiter((self._docs[d].valid_from for d in ids), dtype=np.float64, count=len(ids))
            order = np.argsort(times, kind="stable")
            self._by_time = (times[order], [ids[i] for i in order])
        return self._by_time

    def _time_span(self, f: Filter) -> tuple[int, int]:
        """[low, high) positions in `_sorted_by_time` of the documents in f's valid_from range [min, max)."""
        times = self._sorted_by_time()[0]
        low = 0 if f.valid_from_min is None else int(np.searchsorted(times, f.valid_from_min, side="left"))
        high = len(times) if f.valid_from_max is None else int(np.searchsorted(times, f.valid_from_max, side="left"))
        return low, max(low, high)

    @classmethod
    def of(cls, entries: Iterable[tuple[str, DocAttrs]]) -> MetaIndex:
        out = cls()
        for doc_id, attrs in entries:
            out.put(doc_id, attrs)
        return out


def _union(postings: Mapping[K, set[str]], keys: Iterable[K]) -> set[str]:
    return set().union(*(postings.get(key, set()) for key in keys))


def _discard(postings: dict[K, set[str]], key: K, doc_id: str) -> None:
    holders = postings.get(key)
    if holders is not None:
        holders.discard(doc_id)
        if not holders:
            del postings[key]
