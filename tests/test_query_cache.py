"""The query-embedding cache: repeated queries skip the model, results stay live, the LRU bound holds.

Real SQLite, real FAISS, the real packaged embedder (counted, to see which texts reach the model).
"""

from __future__ import annotations

import numpy as np
import pytest
from indexer_helper import CountingEmbedder

from kfresh.core.config import KfreshConfig
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.query_cache import QueryEmbeddings
from kfresh.indexer.service import Indexer

QUERY = "which moon is made of blue ice"


@pytest.fixture(scope="module")
def embedder(embedder_path):
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


def test_repeated_query_is_embedded_once_and_still_sees_new_documents(tmp_path, embedder):
    counting = CountingEmbedder(embedder)
    with Indexer(KfreshConfig().with_home(tmp_path), embedder=counting) as ix:
        assert ix.search(QUERY, 3) == []
        ix.upsert(DocumentIn("moon", "The moon of Tarsis is called Velna and it is made of blue ice."))
        assert ix.wait_until_indexed("moon", 1, 60)
        hits = ix.search(QUERY, 3)  # the cached vector, searched against the live index
        assert [h.doc_id for h in hits] == ["moon"]
        ix.delete("moon")
        assert ix.search(QUERY, 3) == []
        assert counting.encoded.count(QUERY) == 1


def test_cached_vector_equals_a_fresh_encode_and_cannot_be_modified(embedder):
    cache = QueryEmbeddings(embedder, size=8)
    first = cache.encode(QUERY)
    assert cache.encode(QUERY) is first
    np.testing.assert_allclose(first, embedder.encode([QUERY])[0], atol=1e-6)
    with pytest.raises(ValueError):
        first[0] = 0.0


def test_least_recently_used_is_evicted_at_the_bound(embedder):
    counting = CountingEmbedder(embedder)
    cache = QueryEmbeddings(counting, size=2)
    for q in ("alpha", "beta", "alpha", "gamma"):  # gamma evicts beta: alpha was used more recently
        cache.encode(q)
    assert len(cache) == 2
    cache.encode("alpha")
    cache.encode("beta")
    assert counting.encoded == ["alpha", "beta", "gamma", "beta"]


def test_size_zero_turns_the_cache_off(embedder):
    counting = CountingEmbedder(embedder)
    cache = QueryEmbeddings(counting, size=0)
    cache.encode(QUERY)
    cache.encode(QUERY)
    assert counting.encoded == [QUERY, QUERY] and len(cache) == 0


def test_recent_gives_the_most_recently_used_query_vectors(embedder):
    cache = QueryEmbeddings(embedder, size=8)
    assert cache.recent(4).shape == (0, embedder.dim)
    first, _, third = (cache.encode(q) for q in ("pier hours", "ferry fares", "mayor"))
    cache.encode("pier hours")  # used again: now the most recent
    got = cache.recent(2)
    assert got.shape == (2, embedder.dim)
    np.testing.assert_array_equal(got, np.stack([third, first]))
