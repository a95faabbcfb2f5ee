"""Faults: torn and failed writes. A COMMIT that fails rolls back and later writes succeed; a full disk is
RESOURCE_EXHAUSTED at once while reads continue, and nothing acknowledged is lost across a restart.

The fast tests run in `make test`; the `reliability` one runs in `make reliability` and records its
figures for the README.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from faults_helper import _found, _wait
from reliability_helper import long_only, record
from server_helper import ServerHandle, server_config

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.stores import StoreError
from kfresh.indexer.stores.sqlite import SqliteStore
from kfresh.v1 import kfresh_pb2 as pb


# -- torn and failed writes ------------------------------------------------------------------------
class _FailingCommit:
    """The store's writer connection, except that the next COMMIT fails the way a full disk makes it fail."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.armed and sql.strip().upper() == "COMMIT":
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_failed_commit_rolls_back_and_later_writes_succeed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "kfresh.db")
    store.upsert(DocumentIn("kept", "Acknowledged before the disk filled."), ["Acknowledged before the disk filled."])
    store._w = _FailingCommit(store._w)  # type: ignore[assignment]
    with pytest.raises(StoreError, match="full") as err:
        store.upsert(DocumentIn("torn", "Never acknowledged."), ["Never acknowledged."])
    assert err.value.full and isinstance(err.value.__cause__, sqlite3.OperationalError)
    assert not store._w.in_transaction  # else every later write fails ("transaction within a transaction")
    ack = store.upsert(DocumentIn("after", "Written once space returned."), ["Written once space returned."])
    assert ack.status == "stored"
    store.close()
    reopened = SqliteStore(tmp_path / "kfresh.db")
    assert reopened.current("torn") is None  # nothing half-applied, even after a reopen
    assert reopened.current("kept") is not None and reopened.current("after") is not None
    reopened.close()


def _set_max_pages(handle: ServerHandle, pages: int | None) -> None:
    """A real SQLITE_FULL: cap the database at its current size (None lifts the cap)."""
    store = handle.runtime.indexer._store
    with store._write_lock:
        if pages is None:
            store._w.execute("PRAGMA max_page_count=1073741823")
        else:
            (count,) = store._w.execute("PRAGMA page_count").fetchone()
            store._w.execute(f"PRAGMA max_page_count={count}")


def _doc(i: int, prefix: str = "full") -> pb.Document:
    return document(f"{prefix}-{i}", f"Depot {prefix} {i}: shelf {i} holds {i * 17 + 3} copper bolts. " * 6,
                    metadata={"doc": f"{prefix}-{i}"})  # fmt: skip


def test_disk_full_is_resource_exhausted_reads_continue_and_nothing_acked_is_lost(
    engine_loop: Any, tmp_path: Path
) -> None:
    _disk_full(engine_loop, tmp_path)


@pytest.mark.reliability
@long_only
def test_disk_full_figures(engine_loop: Any, tmp_path: Path) -> None:
    record("disk_full", _disk_full(engine_loop, tmp_path))


def _disk_full(engine_loop: Any, tmp_path: Path) -> dict[str, Any]:
    cfg = server_config(tmp_path, generation__backend="remote", generation__remote_url="http://127.0.0.1:9",
                        generation__remote_timeout_s=1.0)  # fmt: skip
    handle = ServerHandle(engine_loop, cfg, None)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=60, service=SERVICE_NAME)
            acked = [a.id for a in client.ingest([_doc(i) for i in range(10)], timeout=60)]
            _wait(lambda: client.stats().pending == 0)
            _set_max_pages(handle, 0)
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:  # free pages take a few documents, then the disk is full
                for ack in client.ingest([_doc(i, "big") for i in range(200)], timeout=60):
                    acked.append(ack.id)
                    start = time.perf_counter()
            full_ms = (time.perf_counter() - start) * 1000
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "disk full" in err.value.details() and "nothing was acknowledged" in err.value.details()
            assert len(acked) < 10 + 200
            assert all(_found(client, f"full-{i}", _doc(i).text) for i in range(10))  # reads keep working
            assert client.stats().documents == len(acked)

            _set_max_pages(handle, None)  # space is back
            assert [a.status for a in client.ingest([_doc(99, "again")], timeout=30)] == [pb.ACK_STATUS_STORED]
            _wait(lambda: _found(client, "again-99", _doc(99, "again").text))
    finally:
        handle.stop()
    handle = ServerHandle(engine_loop, cfg, None)  # and a restart finds everything acknowledged
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=60, service=SERVICE_NAME)
            _wait(lambda: client.stats().pending == 0)
            for doc_id in acked:  # the ones acknowledged while the embeddings could not be saved too
                prefix, n = doc_id.split("-")
                assert _found(client, doc_id, _doc(int(n), prefix).text), doc_id
            assert _found(client, "again-99", _doc(99, "again").text)
            assert client.stats().documents == len(acked) + 1
    finally:
        handle.stop()
    assert full_ms < 2000
    return {"status": "RESOURCE_EXHAUSTED", "rejected_after_ms": round(full_ms, 1),
            "acknowledged_before_and_during": len(acked), "lost_after_restart": 0}  # fmt: skip
