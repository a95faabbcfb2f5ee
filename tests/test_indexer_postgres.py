"""The Indexer end to end on a real PostgreSQL server (store.kind = postgres): real embedder, real FAISS.

An ack is searchable, an upsert replaces the stale version, a delete really deletes, a full disk is
RESOURCE_EXHAUSTED with nothing acknowledged, and a restart (with or without a snapshot) recovers from
PostgreSQL without embedding anything again. The SQLite variants are in test_indexer.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
from indexer_helper import CountingEmbedder
from pg_helper import DISK_FULL, DISK_SPACE_BACK
from test_indexer import FACTS, config, ingest

from kfresh.core.config import KfreshConfig
from kfresh.core.errors import StorageFull
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.embedding.embedder import SentenceTransformerEmbedder
from kfresh.indexer.service import Indexer
from kfresh.indexer.stores.postgres import PostgresStore

MOON_2 = "The moon of Tarsis is called Velna and it is made of red basalt since the impact."
MOON_Q = "What is the moon of Tarsis made of?"


@pytest.fixture(scope="module")
def embedder(embedder_path):
    return SentenceTransformerEmbedder(embedder_path, device="cpu")


def pg_config(home: Path, dsn: str) -> KfreshConfig:
    return config(home, store={"kind": "postgres", "dsn": dsn})


def texts(ix: Indexer, query: str, doc_id: str) -> list[str]:
    return [h.text for h in ix.search(query, 5) if h.doc_id == doc_id]


def test_ack_search_replace_delete_and_restart_on_postgres(tmp_path, embedder, pg_dsn):
    cfg = pg_config(tmp_path, pg_dsn)
    with Indexer(cfg, embedder=embedder) as ix:
        ack = ix.upsert(DocumentIn("moon", FACTS["moon"], source="atlas", metadata={"topic": "space"}))
        assert (ack.status, ack.version) == ("stored", 1) and ix.wait_until_indexed("moon", 1, 60)
        hit = ix.search(MOON_Q, 1)[0]
        assert (hit.doc_id, hit.text, hit.source, hit.metadata) == ("moon", FACTS["moon"], "atlas", {"topic": "space"})
        ingest(ix, {k: FACTS[k] for k in ("river", "bridge")})

        new = ix.upsert(DocumentIn("moon", MOON_2))
        assert new.version == 2 and ix.wait_until_indexed("moon", 2, 60)
        assert texts(ix, MOON_Q, "moon") == [MOON_2]  # the stale version is gone from search

        gone = ix.delete("bridge")
        assert texts(ix, FACTS["bridge"], "bridge") == []  # at once, before the worker ran
        assert ix.wait_until_indexed("bridge", gone.version, 60)
        assert (ix.stats().documents, ix.stats().indexed_vectors) == (2, 2)

    with PostgresStore(pg_dsn, read_only=True) as store:  # really deleted: no row of the old versions is left
        assert store.chunks_for("bridge", 1) == [] and store.chunks_for("moon", 1) == []
        assert store.current("bridge").deleted and store.unembedded() == []

    counting = CountingEmbedder(embedder)
    for snapshot in ("kept", "lost"):
        if snapshot == "lost":
            shutil.rmtree(cfg.index.snapshot_dir)  # rebuilt from the vectors stored in PostgreSQL
        with Indexer(cfg, embedder=counting) as ix:
            assert texts(ix, MOON_Q, "moon") == [MOON_2], snapshot
            assert texts(ix, FACTS["river"], "river") == [FACTS["river"]], snapshot
            assert texts(ix, FACTS["bridge"], "bridge") == [], snapshot
            assert ix.stats().indexed_vectors == 2
    assert counting.worker_encoded == []  # nothing acknowledged was embedded twice


def test_a_full_postgres_disk_is_resource_exhausted_and_nothing_is_acknowledged(tmp_path, embedder, pg_dsn):
    with Indexer(pg_config(tmp_path, pg_dsn), embedder=embedder) as ix:
        ingest(ix, {"moon": FACTS["moon"]})
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(DISK_FULL)
            with pytest.raises(StorageFull, match="disk full.*nothing was acknowledged"):
                ix.upsert(DocumentIn("river", FACTS["river"]))
            assert texts(ix, MOON_Q, "moon") == [FACTS["moon"]]  # reads keep working
            admin.execute(DISK_SPACE_BACK)
        ingest(ix, {"river": FACTS["river"]})
        assert ix.stats().documents == 2 and ix.stats().pending == 0
