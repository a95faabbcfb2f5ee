"""The Indexer end to end: real SQLite, real FAISS, the real packaged embedder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from indexer_helper import CountingEmbedder, FailingEmbedder, GatedEmbedder, doc_text

from kfresh.core.config import KfreshConfig
from kfresh.core.errors import InvalidInput, Overloaded
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer
from kfresh.indexer.stores import open_store

HELPER = Path(__file__).with_name("indexer_helper.py")
FACTS = {
    "moon": "The moon of Tarsis is called Velna and it is made of blue ice.",
    "river": "The longest river of Oskaria is the Drem, flowing 900 km to the northern sea.",
    "bridge": "The Kallen bridge was opened in 1887 and carries trains across the fjord.",
    "cheese": "Brenmoor cheese is aged for three years in salt caves under the old abbey.",
    "comet": "The comet Ysolde returns every 41 years and was last seen over the southern desert.",
}


@pytest.fixture(scope="module")
def embedder(embedder_path):
    """The real packaged all-MiniLM-L6-v2 (path from conftest's session fixture), loaded once per module."""
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


# The semantic tests (those taking the `backend` fixture) run on every store and vector backend against
# the real engine: the embedded defaults, a real PostgreSQL server, and real milvus-lite.
BACKENDS: dict[str, dict[str, dict]] = {
    "sqlite+faiss": {},
    "postgres+faiss": {"store": {"kind": "postgres"}},  # dsn: a fresh database from the pg_dsn fixture
    "sqlite+milvus": {"index": {"kind": "milvus"}},  # with_home puts the milvus-lite file under the test's home
    "sqlite+torch": {"index": {"kind": "torch", "torch_device": "cpu"}},  # the GPU index's code, on the CPU here
}
_backend: dict[str, dict] = {}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    sections = {section: dict(fields) for section, fields in BACKENDS[request.param].items()}
    if "store" in sections:
        sections["store"]["dsn"] = request.getfixturevalue("pg_dsn")
    if sections.get("index", {}).get("kind") == "milvus":
        pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install -r requirements.txt)")
    _backend.update(sections)
    yield request.param
    _backend.clear()


def config(home: Path, **sections: dict) -> KfreshConfig:
    data = KfreshConfig().with_home(home).model_dump()
    for section, fields in [*_backend.items(), *sections.items()]:
        data[section].update(fields)
    return KfreshConfig.model_validate(data)


@pytest.fixture
def indexer(tmp_path, embedder, backend):
    ix = Indexer(config(tmp_path), embedder=embedder)
    ix.start()
    yield ix
    ix.close()


def ingest(ix: Indexer, docs: dict[str, str], **meta: str) -> None:
    acks = [ix.upsert(DocumentIn(doc_id, text, metadata=dict(meta))) for doc_id, text in docs.items()]
    assert all(ix.wait_until_indexed(a.id, a.version, 60) for a in acks)


def test_ingest_then_search_at_once(indexer):
    ack = indexer.upsert(DocumentIn("moon", FACTS["moon"], source="atlas", metadata={"topic": "space"}))
    assert (ack.status, ack.version, ack.chunks) == ("stored", 1, 1)
    assert indexer.wait_until_indexed("moon", ack.version, 60)
    hits = indexer.search("What is the moon of Tarsis made of?", 3)
    assert hits[0].doc_id == "moon" and hits[0].text == FACTS["moon"] and hits[0].version == 1
    assert (hits[0].source, hits[0].metadata, hits[0].valid_from) == ("atlas", {"topic": "space"}, ack.acked_at)
    stats = indexer.stats()
    assert (stats.documents, stats.chunks, stats.indexed_vectors) == (1, 1, 1)
    assert stats.index_kind == indexer.cfg.index.kind and stats.index_detail.startswith(stats.index_kind)
    assert not stats.index_maintenance_pending  # one vector: nothing to train
    assert stats.freshness.count == 1 and stats.embedder == indexer.embedder.name


def test_search_ranks_filters_and_returns_vectors(indexer):
    ingest(indexer, {k: v for k, v in FACTS.items() if k in ("moon", "river", "bridge")}, lang="en")
    ingest(indexer, {k: v for k, v in FACTS.items() if k in ("cheese", "comet")}, lang="de")
    hits = indexer.search("Which river is the longest in Oskaria?", 5)
    assert hits[0].doc_id == "river" and len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    only_de = indexer.search("Which river is the longest in Oskaria?", 5, {"lang": "de"})
    assert {h.doc_id for h in only_de} == {"cheese", "comet"}
    assert indexer.search("river", 5, {"lang": "fr"}) == []

    hit = indexer.search("aged cheese in salt caves", 1, with_vectors=True)[0]
    expect = indexer.embedder.encode([FACTS["cheese"]])[0]
    assert hit.doc_id == "cheese" and np.allclose(hit.vector, expect, atol=1e-4)
    same = indexer.search_vector(expect, 1)[0]
    assert same.doc_id == "cheese" and same.score == pytest.approx(1.0, abs=1e-4)


def test_new_version_replaces_old_and_no_search_sees_old_or_mixed_versions(tmp_path, embedder, backend):
    # Multi-chunk versions: a half-applied swap would show chunks of two versions of one document at once.
    ix = Indexer(config(tmp_path, store={"chunk_chars": 64, "chunk_overlap": 0}), embedder=embedder)
    ix.start()
    try:

        def text(v: int) -> str:
            return " ".join(f"Revision {v} of the harbour schedule, paragraph {p}." for p in range(3))

        first = ix.upsert(DocumentIn("sched", text(1)))
        assert first.chunks >= 3 and ix.wait_until_indexed("sched", 1, 60)
        floor = [1]  # every version <= floor[0] is known to be searchable
        problems: list[str] = []
        done = threading.Event()

        def write() -> None:
            try:
                for v in range(2, 12):
                    ack = ix.upsert(DocumentIn("sched", text(v)))
                    assert ack.version == v
                    if ix.wait_until_indexed("sched", v, 60):
                        floor[0] = v
            finally:
                done.set()

        writer = threading.Thread(target=write)
        writer.start()
        searches = 0
        while not done.is_set() or searches < 20:
            known = floor[0]
            versions = {h.version for h in ix.search("harbour schedule revision", 10)}
            searches += 1
            if len(versions) != 1:
                problems.append(f"mixed versions {versions}")
            elif min(versions) < known:
                problems.append(f"version {versions} after {known} was searchable")
        writer.join()
        assert not problems, problems[:5]
        assert {h.version for h in ix.search("harbour schedule revision", 10)} == {11}
        assert ix.stats().chunks == first.chunks  # old versions' rows are gone
    finally:
        ix.close()


def test_delete_hides_immediately_even_before_the_worker_runs(tmp_path, embedder, backend):
    gated = GatedEmbedder(embedder)
    gated.gate.set()
    ix = Indexer(config(tmp_path), embedder=gated)
    ix.start()
    try:
        ingest(ix, {"comet": FACTS["comet"], "bridge": FACTS["bridge"]})
        gated.gate.clear()
        ix.upsert(DocumentIn("river", FACTS["river"]))  # the worker is now stuck embedding this
        assert gated.worker_waiting.wait(30)
        gone = ix.delete("comet")
        assert (gone.status, gone.version) == ("deleted", 2)
        assert ix.stats().indexed_vectors == 2  # still in the index...
        assert all(h.doc_id != "comet" for h in ix.search(FACTS["comet"], 5))  # ...but never shown
        back = ix.upsert(DocumentIn("comet", FACTS["comet"]))  # re-created while the delete is pending
        assert (back.status, back.version) == ("stored", 3)
        assert all(h.doc_id != "comet" for h in ix.search(FACTS["comet"], 5))
        gated.gate.set()
        assert ix.wait_until_indexed("comet", 3, 60)
        top = ix.search(FACTS["comet"], 1)[0]
        assert (top.doc_id, top.version) == ("comet", 3)
        assert ix.delete("comet").status == "deleted"
        assert ix.delete("comet").status == "not_found"
        assert ix.delete("never-was").status == "not_found"
        assert ix.wait_until_indexed("comet", 4, 60)
        assert ix.stats().indexed_vectors == 2 and ix.stats().deleted == 1
    finally:
        gated.gate.set()
        ix.close()


def test_identical_reingest_is_idempotent_and_embeds_nothing(tmp_path, embedder, backend):
    counting = CountingEmbedder(embedder)
    with Indexer(config(tmp_path), embedder=counting) as ix:
        doc = DocumentIn("bridge", FACTS["bridge"], source="s", metadata={"a": "b"}, valid_from=1000.0)
        first = ix.upsert(doc)
        assert ix.wait_until_indexed("bridge", 1, 60)
        again = ix.upsert(doc)
        assert (again.status, again.version, again.chunks) == ("unchanged", 1, first.chunks)
        assert ix.wait_until_indexed("bridge", 1, 1)
        assert counting.encoded.count(FACTS["bridge"]) == 1
        assert ix.stats().pending == 0


def test_restart_finds_everything_without_reembedding(tmp_path, embedder, backend):
    cfg = config(tmp_path)
    with Indexer(cfg, embedder=embedder) as ix:
        ingest(ix, FACTS)
        ix.delete("cheese")
        ix.upsert(DocumentIn("moon", FACTS["moon"] + " It has no atmosphere."))
        assert ix.wait_until_indexed("moon", 2, 60) and ix.wait_until_indexed("cheese", 2, 60)
    counting = CountingEmbedder(embedder)
    with Indexer(cfg, embedder=counting) as ix:
        assert ix.stats().indexed_vectors == len(FACTS) - 1
        for doc_id, text in FACTS.items():
            hits = ix.search(text, 1)
            if doc_id == "cheese":
                assert all(h.doc_id != "cheese" for h in hits)
            else:
                assert hits[0].doc_id == doc_id
        assert ix.search(FACTS["moon"], 1)[0].version == 2
        assert counting.worker_encoded == []


def test_sigkill_while_ingesting_loses_no_acknowledged_document(tmp_path, embedder, embedder_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, str(HELPER), str(tmp_path), embedder_path, "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    acked: dict[str, int] = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("ACK "):
                _, doc_id, version = line.split()
                acked[doc_id] = int(version)
                if len(acked) >= 40:
                    break
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    for line in rest.splitlines():  # acks printed before the kill landed count too
        if line.startswith("ACK "):
            _, doc_id, version = line.split()
            acked[doc_id] = int(version)
    assert child.returncode == -signal.SIGKILL and len(acked) >= 40

    store = open_store(config(tmp_path).store)
    unembedded = {d.doc_id for d, _ in store.unembedded()}
    store.close()
    assert len(unembedded) < len(acked)  # the helper waited for doc-9: the kill found embedded docs too
    counting = CountingEmbedder(embedder)
    with Indexer(config(tmp_path), embedder=counting) as ix:
        for doc_id, version in acked.items():
            assert ix.wait_until_indexed(doc_id, version, 120), doc_id
        for doc_id in acked:
            i = int(doc_id.split("-")[1])
            assert doc_id in {h.doc_id for h in ix.search(doc_text(i), 3)}, doc_id
        assert ix.stats().documents >= len(acked)
        # Only what the killed run had not embedded yet is embedded now.
        assert set(counting.worker_encoded) <= {doc_text(int(d.split("-")[1])) for d in unembedded}


def test_search_while_ingesting(indexer):
    docs = {f"n{i}": doc_text(i) for i in range(40)}
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for doc_id, text in docs.items():
                indexer.upsert(DocumentIn(doc_id, text))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    while writer.is_alive():
        hits = indexer.search("lighthouse keeper ships", 5)
        assert len(hits) <= 5 and len({h.chunk_id for h in hits}) == len(hits)
    writer.join()
    assert not errors
    assert all(indexer.wait_until_indexed(d, 1, 60) for d in docs)
    assert indexer.search(doc_text(17), 1)[0].doc_id == "n17"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda ix: ix.upsert(DocumentIn("", "text")), "id"),
        (lambda ix: ix.upsert(DocumentIn("x" * 257, "text")), "id"),
        (lambda ix: ix.upsert(DocumentIn("a", "   ")), "text"),
        (lambda ix: ix.upsert(DocumentIn("a", "x" * 501)), "text"),
        (lambda ix: ix.upsert(DocumentIn("a", "t", metadata={"k": 1})), "metadata"),  # type: ignore[dict-item]
        (lambda ix: ix.upsert(DocumentIn("a", "t", valid_from=float("nan"))), "valid_from"),
        (lambda ix: ix.upsert(DocumentIn("a", "t", supersedes=("",))), "supersedes"),
        (lambda ix: ix.delete(""), "id"),
        (lambda ix: ix.search("", 3), "query"),
        (lambda ix: ix.search("q", -1), "k"),
        (lambda ix: ix.search("q", 1000), "k"),
        (lambda ix: ix.search("q", 3, {"k": 2}), "filters"),  # type: ignore[dict-item]
        (lambda ix: ix.search_vector(np.ones(5), 3), "vector"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_field(tmp_path, embedder, call, field):
    with Indexer(config(tmp_path, store={"max_document_chars": 500}), embedder=embedder) as ix:
        with pytest.raises(InvalidInput, match=field):
            call(ix)
        assert ix.stats().documents == 0


def test_full_queue_is_overloaded_and_the_rejected_doc_is_not_acked(tmp_path, embedder):
    gated = GatedEmbedder(embedder)
    cfg = config(tmp_path, embedder={"queue_size": 1, "queue_wait_ms": 50})
    ix = Indexer(cfg, embedder=gated)
    ix.start()
    try:
        first = ix.upsert(DocumentIn("moon", FACTS["moon"]))
        assert gated.worker_waiting.wait(30)
        with pytest.raises(Overloaded, match="queue"):
            ix.upsert(DocumentIn("river", FACTS["river"]))
        with pytest.raises(Overloaded):
            ix.delete("moon")
        assert ix.stats().documents == 1 and ix.stats().pending == 1
        gated.gate.set()
        assert ix.wait_until_indexed("moon", first.version, 60)
        assert ix.upsert(DocumentIn("river", FACTS["river"])).status == "stored"
    finally:
        gated.gate.set()
        ix.close()


def test_worker_survives_a_failing_embedder(tmp_path, embedder):
    failing = FailingEmbedder(embedder, poison="POISON")
    with Indexer(config(tmp_path), embedder=failing) as ix:
        bad = ix.upsert(DocumentIn("bad", "POISON pill document"))
        ingest(ix, {"river": FACTS["river"]})
        assert not ix.wait_until_indexed("bad", bad.version, 0.5)
        assert ix.worker_failures > 0 and ix.healthy
        ingest(ix, {"bridge": FACTS["bridge"]})
        assert ix.search(FACTS["bridge"], 1)[0].doc_id == "bridge"


def test_ivf_kind_trains_in_the_background_and_restarts(tmp_path, embedder):
    cfg = config(tmp_path, index={"kind": "ivf", "ivf_train_min": 20, "ivf_nlist": 4, "ivf_nprobe": 4})
    docs = {f"n{i}": doc_text(i) for i in range(24)}
    with Indexer(cfg, embedder=embedder) as ix:
        ingest(ix, docs)
        assert ix.search(doc_text(3), 1)[0].doc_id == "n3"
    counting = CountingEmbedder(embedder)
    with Indexer(cfg, embedder=counting) as ix:
        assert ix._state.index.trained and ix.stats().index_kind == "ivf"
        assert ix.search(doc_text(21), 1)[0].doc_id == "n21"
        assert counting.worker_encoded == []
