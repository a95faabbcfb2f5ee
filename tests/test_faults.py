"""Faults: nothing acknowledged is lost. SIGKILL rounds under streaming ingest and SIGTERM drain; failed
and full-disk writes are in test_faults_disk.py, a generation backend that goes away and comes back in
test_faults_generation.py.

The fast tests run in `make test`; the `reliability` ones (more rounds) run in `make reliability` and
record their figures for the README.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kill_helper import KillHarness
from reliability_helper import DocModel, doc_text, kill, long_only, percentiles_ms, record, start_server, wait_serving

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.core.net import free_port
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.stores.sqlite import SqliteStore
from kfresh.v1 import kfresh_pb2 as pb


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
    with sqlite3.connect(tmp_path / "kfresh.db") as conn:  # a version whose history row was never written
        conn.execute("DELETE FROM history WHERE doc_id='d000009'")
    harness.report.half_applied.clear()
    harness._check_rows()
    assert sorted(harness.report.half_applied) == ["d000009: in the store but never sent",
                                                   "history: live d000009 v1 has no open history row"]  # fmt: skip


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
