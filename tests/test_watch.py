"""Watch: document changes streamed once searchable, over real gRPC, the real indexer, store and embedder.

The server is the tenants suite's (`tenant_server`: tokens bound to tenant=acme and tenant=globex, no model).
"""

# ruff: noqa: F811 - tests take the imported tenant_server fixture as a parameter

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import grpc
import pytest
from server_helper import ServerHandle, server_config
from test_security import CannedBackend
from test_tenants import ACME, GLOBEX, tenant_server  # noqa: F401 - the fixture

from kfresh.client import KfreshClient, document
from kfresh.v1 import kfresh_pb2 as pb


def _client(server: ServerHandle, token: str) -> KfreshClient:
    return KfreshClient(f"127.0.0.1:{server.port}", token=token)


class _Collector:
    """Reads a Watch stream on a thread; `take(n)` waits for the next n changes."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.items: queue.Queue[pb.Change] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for change in self.stream:
                self.items.put(change)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED, exc

    def take(self, n: int, timeout: float = 15.0) -> list[pb.Change]:
        deadline = time.monotonic() + timeout
        return [self.items.get(timeout=max(deadline - time.monotonic(), 0.01)) for _ in range(n)]

    def close(self) -> None:
        self.stream.cancel()
        self._thread.join(10)


def test_live_changes_arrive_once_searchable_with_their_lag(tenant_server: ServerHandle) -> None:
    with _client(tenant_server, ACME) as client:
        live = _Collector(client.watch(from_now=True))
        try:
            acks = list(
                client.ingest([document("w-kettle", "The Aurora kettle costs 49 euros.", source="shop/prices")])
            )
            (change,) = live.take(1)
            assert (change.id, change.version, change.op, change.seq) == ("w-kettle", 1, "upsert", acks[0].seq)
            assert change.source == "shop/prices" and change.metadata["tenant"] == "acme"
            assert 0 <= change.lag_ms < 10_000
            assert change.searchable_at.ToNanoseconds() >= change.acked_at.ToNanoseconds()
            # sent only once a search can find it
            assert any(c.doc_id == "w-kettle" and c.version == 1 for c in client.retrieve("Aurora kettle price").chunks)

            list(client.ingest([document("w-kettle", "The Aurora kettle costs 59 euros.", source="shop/prices")]))
            (updated,) = live.take(1)
            assert (updated.version, updated.op) == (2, "upsert")
            client.delete("w-kettle")
            (deleted,) = live.take(1)
            assert (deleted.id, deleted.version, deleted.op) == ("w-kettle", 3, "delete")
            assert updated.seq < deleted.seq
        finally:
            live.close()


def test_the_log_replays_current_versions_and_resumes_after_a_seq(tenant_server: ServerHandle) -> None:
    with _client(tenant_server, ACME) as client:
        docs = [document(f"w-log-{i}", f"Opening hours of store number {i}: 9 to 17.") for i in range(3)]
        acks = list(client.ingest(docs))
        list(client.ingest([document("w-log-0", "Opening hours of store number 0: 8 to 20.")]))
        assert client.wait_searchable(10).searchable
        replay = _Collector(client.watch(after_seq=acks[0].seq - 1))
        try:
            got = replay.take(3)
        finally:
            replay.close()
        # w-log-0 version 1 was replaced: only its current version is in the log's replay, at its own seq
        assert [(c.id, c.version) for c in got] == [("w-log-1", 1), ("w-log-2", 1), ("w-log-0", 2)]
        assert [c.seq for c in got] == sorted(c.seq for c in got)
        resumed = _Collector(client.watch(after_seq=got[1].seq))
        try:
            assert [(c.id, c.version) for c in resumed.take(1)] == [("w-log-0", 2)]
        finally:
            resumed.close()


def test_a_tenant_watches_only_its_own_documents(tenant_server: ServerHandle) -> None:
    with _client(tenant_server, ACME) as acme, _client(tenant_server, GLOBEX) as globex:
        seen = _Collector(globex.watch(from_now=True))
        try:
            list(acme.ingest([document("w-acme-secret", "Acme's supplier discount is 31 percent.")]))
            list(globex.ingest([document("w-globex-news", "Globex opens a store in Turin.")]))
            (change,) = seen.take(1)
            assert change.id == "w-globex-news"
            assert acme.wait_searchable(10).searchable
            time.sleep(1.0)  # the stream's next recheck has read past the acme change
            assert seen.items.empty()
        finally:
            seen.close()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.WatchRequest(after_seq=-1), "after_seq must be >= 0"),
        (pb.WatchRequest(after_seq=3, from_now=True), "not both"),
    ],
)
def test_bad_requests_are_invalid_argument(tenant_server: ServerHandle, request_: pb.WatchRequest, needle: str) -> None:
    with _client(tenant_server, ACME) as client, pytest.raises(grpc.RpcError) as err:
        list(client._stub.Watch(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_kfresh_watch_prints_the_log(
    tenant_server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kfresh.cli import main

    monkeypatch.setenv("KFRESH_CLIENT__TOKEN", GLOBEX)
    with _client(tenant_server, GLOBEX) as client:
        acks = list(client.ingest([document("w-cli", "The Turin store opens at nine.", source="globex/stores")]))
        assert client.wait_searchable(10).searchable
    addr = f"127.0.0.1:{tenant_server.port}"
    assert main(["watch", "--addr", addr, "--after-seq", str(acks[0].seq - 1), "--count", "1", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert (got["id"], got["version"], got["op"], got["source"]) == ("w-cli", "1", "upsert", "globex/stores")
    assert main(["watch", "--addr", addr, "--after-seq", str(acks[0].seq - 1), "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "upsert w-cli v1  searchable" in out and "globex/stores" in out


def test_many_streams_share_one_store_read_per_batch(tenant_server: ServerHandle) -> None:
    feed = tenant_server.runtime.feed
    with _client(tenant_server, GLOBEX) as client:
        streams = [_Collector(client.watch(from_now=True)) for _ in range(12)]
        try:
            time.sleep(0.5)
            reads_before = feed.reads
            docs = [document(f"w-fan-{i}", f"Globex store number {i} opens at {8 + i % 3}.") for i in range(40)]
            acks = list(client.ingest(docs))
            got = [[c.seq for c in s.take(40)] for s in streams]
            assert all(g == [a.seq for a in acks] for g in got)  # every stream: every change once, in order
            # the feed read the log once per applied batch, not once per stream
            assert feed.reads - reads_before <= len(acks)
        finally:
            for s in streams:
                s.close()


def test_a_stream_that_falls_behind_catches_up_from_the_store(engine_loop: Any, tmp_path: Any) -> None:
    import asyncio

    from kfresh.server.watch import ChangeFeed

    handle = ServerHandle(engine_loop, server_config(tmp_path), CannedBackend())
    try:
        indexer = handle.runtime.indexer

        async def scenario() -> list[int]:
            feed = ChangeFeed(indexer, queue_batches=1, batch=4)  # any second batch in the queue cuts it loose
            stream = feed.watch(0, {})
            first = await anext(stream)  # joined; now stop reading while many batches arrive
            with KfreshClient(f"127.0.0.1:{handle.port}") as client:
                for i in range(6):
                    await asyncio.to_thread(lambda i=i: list(client.ingest([document(f"w-cut-{i}", f"Fact {i}.")])))
                    await asyncio.to_thread(client.wait_searchable, 10)
                    await asyncio.sleep(0.3)  # the feed reads each applied batch
            seqs = [first.seq]
            while len(seqs) < 7:
                seqs.append((await asyncio.wait_for(anext(stream), 10)).seq)
            await stream.aclose()
            assert feed.cuts >= 1
            return seqs

        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            (ack,) = list(client.ingest([document("w-cut-start", "The first fact.")]))
            assert client.wait_searchable(10).searchable
        seqs = asyncio.run_coroutine_threadsafe(scenario(), engine_loop.loop).result(120)
        assert seqs == list(range(ack.seq, ack.seq + 7))  # no gap, no repeat, though it was cut loose
    finally:
        handle.stop()
