"""Deletes go through the weights: an adapter that learned a document is withdrawn once the document is deleted,
updated or superseded, and the server serves the newest adapter that did not learn it, or the base model.

The fast tests use the real registry, a real Indexer (SQLite + FAISS + the packaged embedder) as the change log,
and the AdapterManager over the recording backend of tests/test_adapters.py. The slow test is the whole loop:
a real distillation over gRPC, the adapter answering the fact closed-book on vLLM, then a delete.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_adapters import RecordingBackend, _fake_adapter, _publish

from kfresh.core.config import KfreshConfig
from kfresh.core.errors import InvalidInput
from kfresh.finetuner.facts import FACTS_FILE, Fact, write_facts
from kfresh.finetuner.registry import AdapterRegistry
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.rows import DocState
from kfresh.server.adapters import AdapterManager, read_only_statuses
from kfresh.server.withdrawal import WithdrawalWatch, stale_at_start, stale_versions


def _fact(doc_id: str, version: int = 1) -> Fact:
    return Fact(f"the {doc_id}", "height", "12 metres", "2026-01-01T00:00:00Z", doc_id, version, f"{doc_id} is tall.")


def _publish_learning(registry: AdapterRegistry, tmp: Path, name: str, docs: dict[str, int]) -> str:
    folder = _fake_adapter(tmp, name)
    write_facts(folder / FACTS_FILE, [_fact(d, v) for d, v in docs.items()])
    return _publish(registry, folder).version


def test_stale_versions_follow_deletes_updates_and_supersedes():
    learned = {"v0001": {"a": 1}, "v0002": {"a": 1, "b": 2}, "v0003": {"c": 1}, "v0004": {"d": 1}}
    changes = [(10, "a", 1, "upsert"), (11, "b", 3, "upsert"), (12, "c", 1, "delete"), (13, "x", 1, "upsert")]
    stale = stale_versions(learned, changes, superseded={"x": ["d"]})
    assert set(stale) == {"v0002", "v0003", "v0004"}  # a's own learned version is no change
    assert "updated to version 3" in stale["v0002"] and "deleted" in stale["v0003"] and "'x'" in stale["v0004"]

    states = {"a": DocState("a", 2, False, 0.0, 0.0, 5), "c": DocState("c", 1, True, 0.0, 0.0, 6)}
    at_start = stale_at_start(learned, states.get)
    assert set(at_start) == {"v0001", "v0002", "v0003"}  # d: unknown to this store, so nothing says it changed


def test_registry_withdraws_for_good_and_serves_the_newest_allowed_version(tmp_path):
    registry = AdapterRegistry(tmp_path / "registry")
    v1 = _publish_learning(registry, tmp_path, "a", {"keep": 1})
    v2 = _publish_learning(registry, tmp_path, "b", {"keep": 1, "gone": 1})
    v3 = _publish_learning(registry, tmp_path, "c", {"keep": 1, "gone": 1, "new": 1})
    assert registry.pointer()["previous"] == [v1, v2] and registry.learned(v3) == {"keep": 1, "gone": 1, "new": 1}
    pointer = registry.withdraw({v2: "learned gone", v3: "learned gone"})
    assert (pointer["version"], pointer["previous"]) == (v1, [])
    assert set(registry.withdrawn()) == {v2, v3} and registry.withdrawn()[v2]["reason"] == "learned gone"
    with pytest.raises(InvalidInput, match="withdrawn"):
        registry.promote(v3)
    statuses, current = read_only_statuses(registry.root)
    assert current == v1 and [s.withdrawn for s in statuses] == ["", "learned gone", "learned gone"]
    assert registry.withdraw({v1: "learned keep"})["version"] is None  # nothing left: the base model
    assert registry.rollback() is None and registry.current() is None


def test_watch_withdraws_the_served_adapter_when_its_document_is_deleted(tmp_path, embedder_path):
    from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
    from kfresh.indexer.service import Indexer

    registry = AdapterRegistry(tmp_path / "registry")
    cfg = KfreshConfig().with_home(tmp_path / "home")
    with Indexer(cfg, embedder=SentenceTransformerEmbedder(embedder_path, device="cpu")) as ix:
        for doc_id in ("tower", "bridge", "ferry"):
            ix.upsert(DocumentIn(doc_id, f"The {doc_id} of Quillon is 12 metres tall."))
        v1 = _publish_learning(registry, tmp_path, "a", {"tower": 1})
        v2 = _publish_learning(registry, tmp_path, "b", {"tower": 1, "bridge": 1})

        async def scenario() -> list[dict[str, str]]:
            manager = AdapterManager(registry, RecordingBackend())
            await manager.sync()
            assert manager.current_version == v2
            seen: list[dict[str, str]] = []

            async def withdrawn(stale: dict[str, str]) -> None:
                seen.append(stale)
                await manager.sync()

            watch = WithdrawalWatch(registry, ix, on_withdrawn=withdrawn, interval_s=0.05)
            await watch.start()
            assert seen == []  # everything learned is still live
            ix.upsert(DocumentIn("ferry", "The ferry of Quillon leaves at noon."))  # unlearned: no effect
            ix.delete("bridge")
            started = time.perf_counter()
            while manager.current_version == v2:
                assert time.perf_counter() - started < 5, "the served adapter was not withdrawn"
                await asyncio.sleep(0.02)
            assert manager.current_version == v1 and set(registry.withdrawn()) == {v2}
            ix.upsert(DocumentIn("tower", "The tower of Quillon is 14 metres tall."))  # v1 learned version 1
            while manager.current_version:
                assert time.perf_counter() - started < 10, "the older adapter was not withdrawn"
                await asyncio.sleep(0.02)
            await watch.close()
            await manager.close()
            return seen

        seen = asyncio.run(scenario())
    assert [set(s) for s in seen] == [{v2}, {v1}] and "deleted" in seen[0][v2]
    assert "updated to version 2" in seen[1][v1]


def test_a_delete_made_while_the_server_was_down_withdraws_at_start(tmp_path, embedder_path):
    from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
    from kfresh.indexer.service import Indexer

    registry = AdapterRegistry(tmp_path / "registry")
    cfg = KfreshConfig().with_home(tmp_path / "home")
    with Indexer(cfg, embedder=SentenceTransformerEmbedder(embedder_path, device="cpu")) as ix:
        ix.upsert(DocumentIn("tower", "The tower of Quillon is 12 metres tall."))
        ix.delete("tower")
        version = _publish_learning(registry, tmp_path, "a", {"tower": 1})

        async def start() -> str:
            manager = AdapterManager(registry, RecordingBackend())
            await manager.sync()

            async def withdrawn(stale: dict[str, str]) -> None:
                await manager.sync()

            watch = WithdrawalWatch(registry, ix, on_withdrawn=withdrawn)
            await watch.start()
            await watch.close()
            return manager.current_version

        from prometheus_client import REGISTRY

        before = REGISTRY.get_sample_value("kfresh_adapters_withdrawn_total") or 0.0
        assert asyncio.run(start()) == "" and version in registry.withdrawn()
        assert REGISTRY.get_sample_value("kfresh_adapters_withdrawn_total") == before + 1


@pytest.mark.slow
def test_a_deleted_fact_leaves_the_weights_within_seconds(engine_loop, vllm_backend, tmp_path):
    """The whole loop on real components: a document ingested over gRPC, distilled by the Distill RPC (real
    training, the gate), its fact answered closed-book by the served adapter on vLLM; then the document is deleted
    and within seconds the server serves the base model, which does not know the fact."""
    from server_helper import ServerHandle, answer_once, server_config

    from kfresh.client import KfreshClient, document

    cfg = server_config(
        tmp_path / "home", generation__enable_lora=True, generation__adapter_poll_s=0.1,
        finetune__registry_dir=tmp_path / "adapters", finetune__work_dir=tmp_path / "distill",
        finetune__stable_for_s=0.0, finetune__device="cpu", finetune__questions_per_doc=0, finetune__seed=0,
        finetune__time_budget_s=150, finetune__min_new_recall=0.0, finetune__max_general_drop=0.3,
        finetune__max_perplexity_increase=0.3, finetune__worker_nice=0, finetune__worker_threads=2,
    )  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    question, value = "Where does the Saltmarsh ferry depart from?", "Pier 12"
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=120)
            list(client.ingest([document("ferry", "The Saltmarsh ferry departs from Pier 12.", source="harbour")]))
            before, _ = answer_once(client, question, closed_book=True, max_tokens=24)
            assert value not in before  # the base model cannot know a fictional fact
            outcome = client.distill(wait=True, timeout=900)
            assert outcome.version == "v0001", outcome
            learned, done = answer_once(client, question, closed_book=True, max_tokens=24)
            assert done.adapter == "v0001" and value in learned, learned  # the weights know it

            client.delete("ferry")
            deleted_at = time.perf_counter()
            while client.stats().adapter:
                assert time.perf_counter() - deleted_at < 10, "the adapter that learned the document is still served"
                time.sleep(0.05)
            after, done = answer_once(client, question, closed_book=True, max_tokens=24)
            assert done.adapter == "" and value not in after, after
            listing = client.list_adapters()
            assert listing.current == "" and "'ferry'" in listing.adapters[0].withdrawn
        registry = AdapterRegistry(tmp_path / "adapters")
        assert "ferry" in registry.withdrawn()["v0001"]["reason"]
    finally:
        handle.stop()
