"""Session-wide fixtures: the provisioned models, one vLLM engine on a dedicated event loop, a `vllm serve`.

The engine is bound to the asyncio loop it was started on, so every test that talks to it runs its
coroutines on `engine_loop`:

    def test_x(engine_loop, vllm_backend):
        chunks = engine_loop.run(collect(vllm_backend.generate(req)), timeout=60)

A gRPC server under test is started the same way (`engine_loop.run(server.start())`) so that it
shares the loop with the engine, as in production.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

# Before anything imports huggingface_hub: tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM pins torch to one thread per worker otherwise; two is faster on the 2-core CI boxes.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import httpx
import pytest

from kfresh.core.config import GenerationConfig, ModelsConfig
from kfresh.core.net import free_port
from kfresh.testing.servers import stop_group

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


@pytest.fixture(scope="session")
def models_config() -> ModelsConfig:
    """Converted models are cached under the repo (`.kfresh/models`) so runs reuse them."""
    cache = Path(os.environ.get("KFRESH_MODELS_DIR", REPO_ROOT / ".kfresh" / "models"))
    return ModelsConfig(cache_dir=cache)


@pytest.fixture(scope="session")
def generator_path(models_config: ModelsConfig) -> str:
    from kfresh.models import generator_path as resolve

    return resolve(models_config)


@pytest.fixture(scope="session")
def embedder_path(models_config: ModelsConfig) -> str:
    from kfresh.models import embedder_path as resolve

    return resolve(models_config)


class EngineLoop:
    """An asyncio loop running forever in a daemon thread; `run()` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120.0) -> T:
        """Run `coro` on the loop and wait for its result; on timeout the coroutine is cancelled."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        async def _cancel_rest() -> None:
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        try:
            self.run(_cancel_rest(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[EngineLoop]:
    loop = EngineLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the session (tests/pg_helper.py); skips where PostgreSQL is not installed."""
    from pg_helper import PgCluster, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin)")
    cluster = PgCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: Any) -> str:
    """The DSN of a new, empty database on the session's PostgreSQL server."""
    return pg_cluster.create_database()


@pytest.fixture(scope="session")
def vllm_backend(engine_loop: EngineLoop, generator_path: str) -> Iterator[Any]:
    """One started in-process engine for the session: float32 (batch-invariant text), LoRA slots reserved."""
    from kfresh.server.generation.vllm_engine import VllmEngineBackend

    cfg = GenerationConfig(dtype="float32", max_model_len=2048, kv_cache_gib=2, enable_lora=True, max_lora_rank=16)
    backend = VllmEngineBackend(cfg, generator_path, served_model_name="SmolLM2-135M-Instruct")
    engine_loop.run(backend.start(), timeout=300)
    yield backend
    engine_loop.run(backend.shutdown(), timeout=60)


@pytest.fixture(scope="session")
def remote_vllm_server(generator_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` (OpenAI API) on a free loopback port; yields its base URL. Runtime LoRA updates on."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="2",
        OMP_NUM_THREADS="2",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
    )
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", generator_path, "--served-model-name", "SmolLM2-135M-Instruct",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
        "--enable-lora", "--max-lora-rank", "16",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        # Own process group: the server spawns EngineCore and a worker, all stopped together.
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path, timeout_s=240)
        yield url
    finally:
        stop_group(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {timeout_s} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
