"""Faults: a generation backend that goes away and comes back. Answer is UNAVAILABLE fast while it is
down, retrieval keeps working, and answers resume once it is back.

The fast test runs in `make test`; the `reliability` one (a real `vllm serve` killed and restarted) runs
in `make reliability` and records its figures for the README.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from faults_helper import _found, _wait
from reliability_helper import long_only, percentiles_ms, record
from server_helper import ServerHandle, server_config

from kfresh.client import SERVICE_NAME, KfreshClient, document
from kfresh.core.net import free_port


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
        events = [
            '{"choices":[{"delta":{"content":"Pier 7."},"finish_reason":"stop"}],"usage":{"completion_tokens":3}}',
            "[DONE]",
        ]
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

    from kfresh.core.config import GenerationConfig
    from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

    remote = _SwitchableVllm()
    backend = OpenAIRemoteBackend(GenerationConfig(backend="remote"), start_timeout_s=0.5, poll_interval_s=0.1,
                                  transport=httpx.MockTransport(remote))  # fmt: skip
    handle = ServerHandle(engine_loop, server_config(tmp_path), backend)
    try:
        with KfreshClient(f"127.0.0.1:{handle.port}") as client:
            client.wait_ready(timeout=60, service=SERVICE_NAME)
            list(
                client.ingest(
                    [document("ferry", "The ferry leaves from Pier 7.", metadata={"doc": "ferry"})], timeout=30
                )
            )
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

    from kfresh.testing.servers import stop_group

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
