"""Applied-batch listeners (what wakes WaitSearchable without polling): real SQLite, FAISS and embedder."""

from __future__ import annotations

import threading

import pytest

from kfresh.core.config import KfreshConfig
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer


@pytest.fixture(scope="module")
def embedder(embedder_path):
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


def test_listener_runs_after_each_applied_batch_only_while_registered(tmp_path, embedder):
    calls: list[int] = []
    with Indexer(KfreshConfig().with_home(tmp_path), embedder=embedder) as ix:
        woke = threading.Event()

        def listener() -> None:
            calls.append(ix.applied_seq())  # the watermark already covers the batch when listeners run
            woke.set()

        with ix.applied_listener(listener):
            ack = ix.upsert(DocumentIn("a", "The lighthouse of Vantor was rebuilt in 1911."))
            assert woke.wait(60)
            assert ix.wait_until_indexed("a", ack.version, 60)
        assert calls and max(calls) >= ix.acked_seq()
        seen = len(calls)
        ix.upsert(DocumentIn("b", "The Vantor ferry runs twice a day in winter."))
        assert ix.wait_until_indexed("b", 1, 60)
        assert len(calls) == seen  # removed with the block


def test_a_failing_listener_does_not_fail_the_batch(tmp_path, embedder):
    def broken() -> None:
        raise RuntimeError("listener bug")

    with Indexer(KfreshConfig().with_home(tmp_path), embedder=embedder) as ix, ix.applied_listener(broken):
        ix.upsert(DocumentIn("a", "The lighthouse of Vantor was rebuilt in 1911."))
        assert ix.wait_until_indexed("a", 1, 60)
        assert [h.doc_id for h in ix.search("when was the Vantor lighthouse rebuilt", 1)] == ["a"]
        assert ix.stats().pending == 0
        assert ix._worker is not None and ix._worker.failures == 0
