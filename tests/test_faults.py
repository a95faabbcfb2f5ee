"""Faults: nothing acknowledged is lost. SIGKILL rounds under streaming ingest, failed and full-disk
writes, SIGTERM drain, and a generation backend that goes away and comes back.

The fast tests run in `make test`; the `reliability` ones (more rounds, a real `vllm serve` killed and
restarted) run in `make reliability` and record their figures for the README.
"""
from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.stores import StoreError
from kfresh.indexer.stores.sqlite import SqliteStore
from kfresh.net import free_port
from kfresh.v1 import kfresh_pb2 as pb
from reliability_helper import (
    DocModel, KillHarness, doc_text, kill, long_only, percentiles_ms, record, start_server, wait_serving,
)  # fmt: skip
from server_helper import ServerHandle, server_config


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


def _found(client: KfreshClient, doc_id: str, text: str) -> bool:
    chunks = client.retrieve(text, k=1, filter={"doc": doc_id}, timeout=30).chunks
    return bool(chunks) and chunks[0].doc_id == doc_id


def _doc(i: int, prefix: str = "full") -> pb.Document:
    return document(f"{prefix}-{i}", f"Depot {prefix} {i}: shelf {i} holds {i * 17 + 3} copper bolts. " * 6,
                    metadata={"doc": f"{prefix}-{i}"})  # fmt: skip


def test_disk_full_is_resource_exhausted_reads_continue_and_nothing_acked_is_lost(engine_loop: Any, tmp_path: Path) -> None:
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


def _wait(cond: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- SIGKILL rounds --------------------------------------------------------------------------------
def test_the_kill_round_checker_catches_lost_stale_and_phantom_documents(tmp_path: Path) -> None:
    """The checker is not vacuous: a lost, a stale and a never-sent document in the store are all reported."""
    store = SqliteStore(tmp_path / "kfresh.db")
    for doc_id in ("d000001", "d000009"):
        text = doc_text(doc_id, 0)
        store.upsert(DocumentIn(doc_id, text, metadata={"doc": doc_id}), [text])
    store.close()
    harness = KillHarness(tmp_path, seed=0)
    harness.docs = {
        "d000001": DocModel(acked_version=2, acked_rev=1, sent_rev=1),  # the store holds v1: stale
        "d000002": DocModel(acked_version=1, acked_rev=0, sent_rev=0),  # acknowledged, absent: lost
    }  # d000009 was never sent: a phantom
    harness._check_rows()
    r = harness.report
    assert [x.split(":")[0] for x in r.stale] == ["d000001"]
    assert [x.split(":")[0] for x in r.lost] == ["d000002"]
    assert [x.split(":")[0] for x in r.half_applied] == ["d000009"]


@pytest.mark.slow
def test_sigkill_rounds_lose_nothing_acknowledged(tmp_path: Path) -> None:
    harness = KillHarness(tmp_path, seed=7)
    harness.round(max_delay_s=1.0)
    harness.round(max_delay_s=1.0, damage_snapshot=True, kill_in_recovery=True)
    harness.final_check(sample=30)
    r = harness.report
    assert r.rounds == 2 and r.upserts_acked > 0 and r.recovery_kills == 1
    assert not r.lost and not r.stale and not r.half_applied, (r.lost[:5], r.stale[:5], r.half_applied[:5])


@pytest.mark.reliability
@long_only
def test_sigkill_rounds_long(tmp_path: Path) -> None:
    rounds = int(os.environ.get("KFRESH_KILL_ROUNDS", "25"))
    harness = KillHarness(tmp_path, seed=2026)
    for n in range(1, rounds + 1):
        harness.round(damage_snapshot=n % 5 == 0, kill_in_recovery=n % 4 == 0)
    harness.final_check(sample=300)
    figures = harness.report.figures(harness.docs)
    record("sigkill_rounds", figures)
    r = harness.report
    assert not r.lost and not r.stale and not r.half_applied, (r.lost[:5], r.stale[:5], r.half_applied[:5])


# -- SIGTERM: NOT_SERVING at once, in-flight calls finish or end within the grace period --------------
def _slow_docs(n: int, gap_s: float, prefix: str) -> Iterator[pb.Document]:
    for i in range(n):
        yield document(f"{prefix}-{i}", f"Drain {prefix} {i}: crate {i} weighs {i * 3 + 1} kilograms.")
        time.sleep(gap_s)


@pytest.mark.slow
def test_sigterm_flips_health_and_drains_within_the_grace_period(tmp_path: Path) -> None:
    _sigterm_drain(tmp_path)


@pytest.mark.reliability
@long_only
def test_sigterm_and_unavailable_figures(tmp_path: Path) -> None:
    record("sigterm_drain", _sigterm_drain(tmp_path))


def _sigterm_drain(tmp_path: Path) -> dict[str, Any]:
    port, grace = free_port(), 2.0
    addr = f"127.0.0.1:{port}"
    proc = start_server(tmp_path, port, "--server.grace_s", str(grace))
    try:
        wait_serving(addr, proc)
        with KfreshClient(addr) as client:
            # The model is unreachable: Answer fails fast with UNAVAILABLE while retrieval works.
            latencies = []
            for _ in range(10):
                start = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    list(client.answer("Which crate is heaviest?", timeout=10))
                latencies.append(time.perf_counter() - start)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert max(latencies) < 2.0, latencies
            client.retrieve("crate", k=1, timeout=10)

        channel = grpc.insecure_channel(addr)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        statuses: queue.Queue[tuple[float, int]] = queue.Queue()
        threading.Thread(target=_watch, args=(watch, statuses), daemon=True).start()
        assert statuses.get(timeout=10)[1] == health_pb2.HealthCheckResponse.SERVING

        outcomes: dict[str, Any] = {}
        short = threading.Thread(target=_stream, args=(addr, _slow_docs(5, 0.1, "short"), "short", outcomes))
        long = threading.Thread(target=_stream, args=(addr, _slow_docs(200, 0.1, "long"), "long", outcomes))
        short.start()
        long.start()
        time.sleep(0.3)  # both streams are in flight
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        at, status = statuses.get(timeout=5)
        not_serving_s = at - sigterm_at
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and not_serving_s < 0.5
        assert proc.wait(timeout=grace + 30) == 0
        exit_s = time.monotonic() - sigterm_at
        short.join(timeout=10)
        long.join(timeout=10)
        channel.close()
    finally:
        kill(proc)
    assert outcomes["short"][0] == "ok" and outcomes["short"][1] == 5  # finished inside the grace period
    code = outcomes["long"][0]
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), code  # cut off at the grace period
    assert exit_s < grace + 10, exit_s
    acked_long = outcomes["long"][1]
    assert acked_long > 0

    port = free_port()  # everything acknowledged during the drain is there after a restart
    proc = start_server(tmp_path, port)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        with KfreshClient(f"127.0.0.1:{port}") as client:
            assert client.stats().documents >= 5 + acked_long
    finally:
        kill(proc)
    return {"grace_s": grace, "not_serving_after_sigterm_ms": round(not_serving_s * 1000, 1),
            "exit_after_sigterm_s": round(exit_s, 2), "stream_past_grace_ended_with": code.name,
            "answer_unavailable_model_unreachable": percentiles_ms(latencies)}  # fmt: skip


def _watch(call: Any, out: queue.Queue[tuple[float, int]]) -> None:
    try:
        for reply in call:
            out.put((time.monotonic(), reply.status))
    except grpc.RpcError:
        pass


def _stream(addr: str, docs: Iterator[pb.Document], name: str, outcomes: dict[str, Any]) -> None:
    acked = 0
    try:
        with KfreshClient(addr) as client:
            for _ in client.ingest(docs, timeout=60):
                acked += 1
        outcomes[name] = ("ok", acked)
    except grpc.RpcError as exc:
        outcomes[name] = (exc.code(), acked)


# -- a generation backend that goes away and comes back ---------------------------------------------
class _SwitchableVllm:
    """An OpenAI-compatible endpoint for httpx.MockTransport that can be taken down and brought back."""

    def __init__(self) -> None:
        self.up = False

    def __call__(self, request: Any) -> Any:
        import httpx

        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        events = ['{"choices":[{"delta":{"content":"Pier 7."},"finish_reason":"stop"}],"usage":{"completion_tokens":3}}', "[DONE]"]
        return httpx.Response(200, content="".join(f"data: {e}\n\n" for e in events).encode())


def _answer_status(client: KfreshClient) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        text = "".join(e.delta for e in client.answer("Where does the ferry leave from?", timeout=10))
        return text, time.perf_counter() - start
    except grpc.RpcError as exc:
        return exc.code().name, time.perf_counter() - start


def test_failing_generation_backend_is_unavailable_fast_and_answers_resume(engine_loop: Any, tmp_path: Path) -> None:
    import httpx

    from kfresh.config import GenerationConfig
    from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

    remote = _SwitchableVllm()
    backend = OpenAIRemoteBackend(GenerationConfig(backend="remote"), start_timeout_s=0.5, poll_interval_s=0.1,
                                  transport=httpx.MockTransport(remote))  # fmt: skip
    handle = ServerHandle(engine_loop, server_config(tmp_path), backend)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=60, service=SERVICE_NAME)
            list(client.ingest([document("ferry", "The ferry leaves from Pier 7.", metadata={"doc": "ferry"})], timeout=30))
            time.sleep(1.0)  # the backend's start gave up: the server booted without a model
            assert _answer_status(client)[0] == "UNAVAILABLE"
            remote.up = True  # the model server comes up after the kfresh server
            time.sleep(1.1)
            assert _answer_status(client)[0].startswith("Pier 7.")  # then the quoted source sentence
            remote.up = False  # and goes down again
            down = [_answer_status(client) for _ in range(5)]
            assert {s for s, _ in down} == {"UNAVAILABLE"} and max(t for _, t in down) < 2.0, down
            _wait(lambda: _found(client, "ferry", "The ferry leaves from Pier 7."), 10)  # retrieval keeps working
            remote.up = True
            time.sleep(1.1)
            assert _answer_status(client)[0].startswith("Pier 7.")
    finally:
        handle.stop()


# -- long: a real `vllm serve` killed and restarted under a kfresh server --------------------------
@pytest.mark.reliability
@long_only
def test_real_vllm_serve_killed_and_restarted(engine_loop: Any, generator_path: str, tmp_path: Path) -> None:
    from conftest import _wait_healthy
    from kfresh.benchmarks.servers import stop_group

    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def start_vllm() -> subprocess.Popen[bytes]:
        log = tmp_path / "vllm.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", generator_path,
               "--served-model-name", "SmolLM2-135M-Instruct", "--host", "127.0.0.1", "--port", str(port),
               "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "2048"]  # fmt: skip
        with log.open("ab") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(proc, url, log, timeout_s=300)
        return proc

    vllm = start_vllm()
    cfg = server_config(tmp_path, generation__backend="remote", generation__remote_url=url)
    handle = ServerHandle(engine_loop, cfg, None)
    figures: dict[str, Any] = {}
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=120)
            list(client.ingest([document("ferry", "The Avel ferry leaves from Pier 7.", metadata={"doc": "ferry"})]))
            _wait(lambda: _found(client, "ferry", "The Avel ferry leaves from Pier 7."))
            assert "7" in _answer_status(client)[0]
            os.killpg(vllm.pid, signal.SIGKILL)
            vllm.wait(timeout=30)
            down = [_answer_status(client) for _ in range(10)]
            assert {s for s, _ in down} == {"UNAVAILABLE"}
            assert _found(client, "ferry", "The Avel ferry leaves from Pier 7.")
            restarted = time.monotonic()
            vllm = start_vllm()
            vllm_start_s = time.monotonic() - restarted
            _wait(lambda: _answer_status(client)[0] not in ("UNAVAILABLE",), 30)
            resumed_s = time.monotonic() - restarted
            assert "7" in _answer_status(client)[0]
            figures = {"unavailable_while_down": percentiles_ms([t for _, t in down]),
                       "vllm_restart_s": round(vllm_start_s, 1), "answers_resumed_after_restart_s": round(resumed_s, 1)}  # fmt: skip
    finally:
        handle.stop()
        stop_group(vllm)
    record("generation_backend_killed", figures)
