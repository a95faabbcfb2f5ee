"""What only the PostgreSQL store has to prove, on a real server (conftest `pg_dsn`): several replicas
writing at once, a full disk, the finetuner's read-only view, and the settings that reach it.

The semantics it shares with SQLite are tested on both backends in test_store.py.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from pg_helper import DISK_FULL, DISK_SPACE_BACK

from kfresh.core.config import FinetuneConfig, StoreConfig, load_config
from kfresh.finetuner.plan import _live_versions
from kfresh.finetuner.selection import select_documents
from kfresh.indexer.documents import Ack, DocumentIn
from kfresh.indexer.stores import StoreError, open_store, store_exists
from kfresh.indexer.stores.postgres import PostgresStore

WRITERS = 4  # threads, alternating between two replicas
ROUNDS = 25


def _write(store: PostgresStore, t: int, acks: list[Ack], errors: list[BaseException]) -> None:
    """Writer `t`: new versions of one document every writer shares and of its own; writer 0 also deletes."""
    try:
        for i in range(ROUNDS):
            for doc_id in ("shared", f"own-{t}"):
                acks.append(store.upsert(DocumentIn(doc_id, f"{doc_id} by {t}, round {i}"), [f"round {i}"]))
            if t == 0 and i % 5 == 4:
                acks.append(store.delete("shared"))
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def _tail(store: PostgresStore, seen: list[tuple[int, str, int, str]], writing_done: threading.Event) -> None:
    """A follower: changes_since(the last seq it read), again and again, until the writers are done."""
    last = 0
    while True:
        finished = writing_done.is_set()  # read before the last pass, so that pass sees everything
        for change in store.changes_since(last):
            seen.append(change)
            last = change[0]
        if finished:
            return
        store.wait_for_change(last, 0.05)


def test_two_replicas_writing_at_once_keep_versions_gapless_and_the_log_in_commit_order(pg_dsn):
    replicas = [PostgresStore(pg_dsn), PostgresStore(pg_dsn)]
    acks: list[Ack] = []
    errors: list[BaseException] = []
    tailed: list[tuple[int, str, int, str]] = []
    writing_done = threading.Event()
    try:
        writers = [threading.Thread(target=_write, args=(replicas[t % 2], t, acks, errors)) for t in range(WRITERS)]
        follower = threading.Thread(target=_tail, args=(replicas[1], tailed, writing_done))
        for th in [follower, *writers]:
            th.start()
        for th in writers:
            th.join(120)
        writing_done.set()
        follower.join(30)
        assert not errors, errors[:3]
        log = replicas[0].changes_since(0)
        # The follower missed nothing and saw nothing twice: no seq was committed below one it had read.
        assert tailed == log
        seqs = [c[0] for c in log]
        written = [a for a in acks if a.status in ("stored", "deleted")]
        assert seqs == sorted(set(seqs)) and sorted(a.seq for a in written) == seqs
        for doc_id in {c[1] for c in log}:  # versions 1..n per document, in log order, no gap, no duplicate
            versions = [c[2] for c in log if c[1] == doc_id]
            assert versions == list(range(1, len(versions) + 1)), (doc_id, versions)
            assert replicas[0].current(doc_id).version == len(versions)
        assert replicas[0].current("shared").version == WRITERS * ROUNDS + ROUNDS // 5
    finally:
        for store in replicas:
            store.close()


def test_a_full_disk_fails_the_write_as_full_and_leaves_nothing_behind(pg_dsn):
    store = PostgresStore(pg_dsn)
    try:
        store.upsert(DocumentIn("kept", "Acknowledged before the disk filled."), ["kept"])
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(DISK_FULL)
            with pytest.raises(StoreError, match="No space left") as err:
                store.upsert(DocumentIn("torn", "Never acknowledged."), ["torn"])
            assert err.value.full and err.value.__cause__.sqlstate == "53100"
            admin.execute(DISK_SPACE_BACK)
        assert store.upsert(DocumentIn("after", "Written once space returned."), ["after"]).status == "stored"
        assert store.current("torn") is None and store.counts() == (2, 2, 0)
        assert [c[1] for c in store.changes_since(0)] == ["kept", "after"]
    finally:
        store.close()


def test_the_finetuner_reads_postgres_read_only(pg_dsn):
    cfg = StoreConfig(kind="postgres", dsn=pg_dsn)
    assert not store_exists(cfg) and _live_versions(cfg) == {}
    with pytest.raises(FileNotFoundError, match="ingest documents first"):
        select_documents(FinetuneConfig(), cfg)
    with open_store(cfg) as store:
        store.upsert(DocumentIn("a", "The mayor is Dessa Varn.", source="council/a"), ["x"], now=1.0)
        store.upsert(
            DocumentIn("b", "The tower is 212 metres tall.", source="city/b", supersedes=("c",)), ["x"], now=1.0
        )
        store.upsert(DocumentIn("c", "The tower is 190 metres tall.", source="city/c"), ["x"], now=1.0)
        store.upsert(DocumentIn("d", "A rumour.", source="forum/d"), ["x"], now=1.0)
        store.delete("a")
        store.upsert(DocumentIn("a", "The mayor is Oren Pask.", source="council/a"), ["x"], now=1.0)
        store.record_citations([("a", 3)])
    assert store_exists(cfg)
    ft = FinetuneConfig(trusted_sources=["council/*", "city/*"], stable_for_s=0.0)
    chosen = select_documents(ft, cfg)
    assert [d.doc_id for d in chosen.docs] == ["a", "b"] and chosen.docs[0].version == 3
    assert chosen.skipped == {"c": "superseded by b", "d": "untrusted source 'forum/d'"}
    cited = select_documents(ft.model_copy(update={"require_cited": True}), cfg)
    assert [d.doc_id for d in cited.docs] == ["a"]
    assert _live_versions(cfg) == {"a": 3, "b": 1, "c": None, "d": 1}
    with open_store(cfg, read_only=True) as ro:  # refused by the server, not only by the store's code
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            ro._fetchall("DELETE FROM documents")
        with pytest.raises(StoreError, match="read-only"):
            ro.delete("a")


def test_the_dsn_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("KFRESH_STORE__KIND", "postgres")
    monkeypatch.setenv("KFRESH_STORE__DSN", "postgresql://kfresh:s3cret-pw@db.internal:5432/kfresh")
    cfg = load_config()
    assert cfg.store.kind == "postgres" and cfg.store.dsn.get_secret_value().endswith("@db.internal:5432/kfresh")
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in cfg.model_dump_json()
    monkeypatch.setenv("KFRESH_STORE__DSN", "")
    with pytest.raises(ValueError, match="store.dsn is empty"):
        load_config()
    unreachable = StoreConfig(
        kind="postgres", dsn="host=127.0.0.1 port=1 user=kfresh password=s3cret-pw connect_timeout=2"
    )
    with pytest.raises(StoreError, match="cannot open the document store at host=127.0.0.1 port=1") as err:
        open_store(unreachable).close()
    assert "s3cret-pw" not in str(err.value)


def test_reads_survive_the_server_dropping_every_connection(pg_dsn, monkeypatch):
    """After a restart or failover the pooled read connections are dead; the next reads get fresh ones, and
    the next write a fresh writer (checked after an idle second; 0 here, so the test need not wait)."""
    from kfresh.indexer.stores import postgres

    monkeypatch.setattr(postgres, "_WRITER_CHECK_IDLE_S", 0.0)
    store = open_store(StoreConfig(kind="postgres", dsn=pg_dsn))
    try:
        store.upsert(DocumentIn("d", "a document"), ["a document"])
        assert store.current("d") is not None  # the pool now holds a connection that has been used
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 2  # the writer and at least one pooled reader
        for _ in range(3):
            cur = store.current("d")
            assert cur is not None and cur.version == 1
        assert store.upsert(DocumentIn("d", "a new text"), ["a new text"]).version == 2  # the writer is replaced too
    finally:
        store.close()
