"""Read your writes across replicas: a write acknowledged by replica A is read on replica B with min_seq.

Two real servers follow one shared store (SQLite here, as the replicas tests do; PostgreSQL works the same
way through the change log). Replica B polls the log slowly, so without min_seq a read right after the write
would usually miss it; with the ack's seq, B waits until it has applied the write.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from server_helper import ServerHandle, server_config
from test_security import CannedBackend

from kfresh.client import KfreshClient, Session, document


@pytest.fixture(scope="module")
def pair(engine_loop: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, ServerHandle]]:
    shared = tmp_path_factory.mktemp("ryw") / "shared.db"

    def replica(name: str, poll_s: float) -> ServerHandle:
        cfg = server_config(
            tmp_path_factory.mktemp(name), store__path=shared, replication__follow="on", replication__poll_s=poll_s,
            retrieval__min_seq_wait_s=10.0,
        )  # fmt: skip
        return ServerHandle(engine_loop, cfg, CannedBackend())

    a, b = replica("a", 0.2), replica("b", 2.0)
    yield a, b
    b.stop()
    a.stop()


def _client(server: ServerHandle) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}")


def test_a_session_reads_its_write_on_the_other_replica(pair: tuple[ServerHandle, ServerHandle]) -> None:
    a, b = pair
    session = Session()
    with _client(a) as on_a, _client(b) as on_b:
        for n in range(3):
            text = f"The Varn ferry timetable number {n} says the last boat leaves at {20 + n}:00."
            (ack,) = list(session.ingest(on_a, [document(f"ryw-{n}", text)]))
            assert session.seq == ack.seq > 0
            started = time.monotonic()
            chunks = session.retrieve(on_b, f"Varn ferry timetable number {n} last boat").chunks
            assert any(c.doc_id == f"ryw-{n}" for c in chunks), (n, [c.doc_id for c in chunks])
            assert time.monotonic() - started < 10
        deleted = session.delete(on_a, "ryw-0")
        assert deleted.seq == session.seq > ack.seq
        chunks = session.retrieve(on_b, "Varn ferry timetable number 0 last boat", k=10).chunks
        assert all(c.doc_id != "ryw-0" for c in chunks)  # the delete is read too
        done = [e.done for e in session.answer(on_b, "When does the last boat leave?") if e.HasField("done")]
        assert done and done[0].citations  # Answer takes min_seq as well


def test_a_seq_this_replica_has_not_applied_is_unavailable_with_how_far_it_is(engine_loop: Any, tmp_path: Path) -> None:
    handle = ServerHandle(engine_loop, server_config(tmp_path, retrieval__min_seq_wait_s=0.3), CannedBackend())
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            (ack,) = list(client.ingest([document("ryw-x", "Harbour fees rose to nine euros.")]))
            assert client.retrieve("harbour fees", min_seq=ack.seq).chunks  # its own write: no wait needed
            with pytest.raises(grpc.RpcError) as err:
                client.retrieve("harbour fees", min_seq=ack.seq + 1000)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"not yet seq {ack.seq + 1000}" in err.value.details() and "retry" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(client.answer("harbour fees?", min_seq=-1))
            assert (
                err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_seq must be >= 0" in err.value.details()
            )
    finally:
        handle.stop()
