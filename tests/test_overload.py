"""Load: past the bounded ingest queue and the answer concurrency limit the server says RESOURCE_EXHAUSTED
within milliseconds, its memory stays flat, it recovers when the load drops, and a cancelled or timed-out
Answer frees its vLLM slot at once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from reliability_helper import kill, long_only, percentiles_ms, record, start_server, wait_serving
from server_helper import ServerHandle, server_config

from kfresh.client import KfreshClient, document
from kfresh.core.net import free_port

pytestmark = pytest.mark.slow


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _flood(addr: str, seconds: float, threads: int, wave: int) -> tuple[list[float], list[float], list[str]]:
    """Single-document Ingest calls from `threads` clients for `seconds`: (ok latencies, rejected latencies, acked ids)."""
    ok: list[float] = []
    rejected: list[float] = []
    acked: list[str] = []
    other: list[str] = []
    stop = time.monotonic() + seconds

    def client_loop(t: int) -> None:
        with KfreshClient(addr) as client:
            n = 0
            while time.monotonic() < stop:
                n += 1
                doc_id = f"w{wave}-t{t}-{n}"
                text = f"Flood {doc_id}: bay {n} of wave {wave} stores {n * 11} barrels of tar. " * 25
                start = time.perf_counter()
                try:
                    list(client.ingest([document(doc_id, text, metadata={"doc": doc_id})], timeout=30))
                    ok.append(time.perf_counter() - start)
                    acked.append(doc_id)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        rejected.append(time.perf_counter() - start)
                    else:
                        other.append(f"{exc.code().name}: {exc.details()}")

    workers = [threading.Thread(target=client_loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not other, other[:3]
    return ok, rejected, acked


def _ingest_overload(tmp_path: Path, *, waves: int, seconds: float, threads: int) -> dict[str, Any]:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    proc = start_server(tmp_path, port, "--embedder.queue_size", "8", "--embedder.queue_wait_ms", "0")
    try:
        wait_serving(addr, proc)
        rss, ok, rejected, acked = [], [], [], []
        with KfreshClient(addr) as client:
            for wave in range(waves):
                o, r, a = _flood(addr, seconds, threads, wave)
                ok += o
                rejected += r
                acked += a
                deadline = time.monotonic() + 120
                while client.stats().pending and time.monotonic() < deadline:  # the load drops: it catches up
                    time.sleep(0.1)
                rss.append(round(_rss_mb(proc.pid), 1))
            recovered = time.perf_counter()
            list(
                client.ingest([document("after-flood", "The flood is over; the tar barrels are counted.")], timeout=30)
            )
            recover_ms = (time.perf_counter() - recovered) * 1000
            while client.stats().pending and time.monotonic() < deadline:
                time.sleep(0.1)
            stats = client.stats()
            missing = [d for d in acked[:: max(1, len(acked) // 50)]
                       if not [c for c in client.retrieve(f"Flood {d}:", k=1, filter={"doc": d}).chunks if c.doc_id == d]]  # fmt: skip
    finally:
        kill(proc)
    assert rejected, "the flood never filled the queue"
    assert stats.documents == len(acked) + 1 and stats.pending == 0 and not missing, missing
    return {"waves": waves, "seconds_per_wave": seconds, "client_threads": threads, "queue_size": 8,
            "acknowledged": len(acked), "rejected_resource_exhausted": len(rejected), "lost": len(missing),
            "rejection_latency": percentiles_ms(rejected), "accepted_latency": percentiles_ms(ok),
            "server_rss_mb_after_each_wave": rss, "ingest_after_flood_ms": round(recover_ms, 1)}  # fmt: skip


def test_ingest_flood_is_resource_exhausted_fast_and_recovers(tmp_path: Path) -> None:
    figures = _ingest_overload(tmp_path, waves=2, seconds=3.0, threads=6)
    assert figures["rejection_latency"]["p50_ms"] < 100, figures
    # The first waves warm allocators and gRPC threads; the long suite shows the curve flattening.
    assert figures["server_rss_mb_after_each_wave"][-1] - figures["server_rss_mb_after_each_wave"][0] < 200, figures


@pytest.mark.reliability
@long_only
def test_ingest_flood_long(tmp_path: Path) -> None:
    figures = _ingest_overload(tmp_path, waves=5, seconds=15.0, threads=8)
    record("ingest_overload", figures)
    rss = figures["server_rss_mb_after_each_wave"]
    assert rss[-1] - rss[1] < 100, figures  # flat after the first wave warmed the caches


# -- answers: bounded concurrency, cancellation frees the vLLM slot ----------------------------------
@pytest.fixture(scope="module")
def one_slot(engine_loop: Any, vllm_backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = server_config(tmp_path_factory.mktemp("overload"), answer__max_concurrent=1)
    handle = ServerHandle(engine_loop, cfg, vllm_backend)
    yield handle
    handle.stop()


def _hold_slot(addr: str, started: threading.Event, out: dict[str, Any], timeout: float | None = None) -> Any:
    """A long Answer in a thread; returns the call so the test can cancel it."""
    client = KfreshClient(addr)
    call = client._stub.Answer(_request(), timeout=timeout)

    def consume() -> None:
        try:
            for _ in call:
                started.set()
            out["code"] = "OK"
        except grpc.RpcError as exc:
            out["code"] = exc.code()
        finally:
            started.set()
            client.close()

    threading.Thread(target=consume, daemon=True).start()
    return call


def _request() -> Any:
    from kfresh.v1 import kfresh_pb2 as pb

    return pb.AnswerRequest(
        question="Write a long story about the sea and its ships.", max_tokens=1000, closed_book=True
    )


def _wait_idle(backend: Any, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    while backend.num_running() and time.monotonic() - start < timeout_s:
        time.sleep(0.01)
    assert backend.num_running() == 0, "the engine still holds the request"
    return time.monotonic() - start


def _answer_overload(handle: ServerHandle, backend: Any, calls: int) -> dict[str, Any]:
    addr = f"127.0.0.1:{handle.port}"
    started, out = threading.Event(), {}
    with KfreshClient(addr) as client:
        client.wait_ready(timeout=120)
        call = _hold_slot(addr, started, out)
        assert started.wait(60)
        rejected = []
        for _ in range(calls):
            start = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                list(client.answer("Say hello.", closed_book=True, max_tokens=4, timeout=10))
            rejected.append(time.perf_counter() - start)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert backend.num_running() == 1
        call.cancel()  # the client goes away: the slot and the engine's sequence are freed
        freed_s = _wait_idle(backend)
        text = "".join(e.delta for e in client.answer("Say hello.", closed_book=True, max_tokens=4, timeout=60))
        assert text.strip()

        started, out = threading.Event(), {}
        t0 = time.monotonic()
        _hold_slot(addr, started, out, timeout=1.0)  # a deadline does the same
        assert started.wait(60)
        _wait_idle(backend, timeout_s=10)
        deadline_freed_s = time.monotonic() - t0 - 1.0
        time.sleep(0.2)
        assert out.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED, out
        text = "".join(e.delta for e in client.answer("Say hello.", closed_book=True, max_tokens=4, timeout=60))
        assert text.strip()
    return {"max_concurrent": 1, "rejected_calls": calls, "rejection_latency": percentiles_ms(rejected),
            "engine_freed_after_cancel_ms": round(freed_s * 1000, 1),
            "engine_freed_after_deadline_s": round(deadline_freed_s, 2)}  # fmt: skip


def test_answer_limit_is_resource_exhausted_fast_and_cancel_frees_the_slot(
    one_slot: ServerHandle, vllm_backend: Any
) -> None:
    figures = _answer_overload(one_slot, vllm_backend, calls=20)
    assert figures["rejection_latency"]["p50_ms"] < 100, figures
    assert figures["engine_freed_after_cancel_ms"] < 2000, figures


@pytest.mark.reliability
@long_only
def test_answer_overload_long(one_slot: ServerHandle, vllm_backend: Any) -> None:
    record("answer_overload", _answer_overload(one_slot, vllm_backend, calls=300))
