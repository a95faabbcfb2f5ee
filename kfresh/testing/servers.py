"""The system under test: a `kfresh serve` the suite starts (own process group, temporary home) or an --addr.

A suite that needs no generation starts the server with the remote backend pointed at a closed port,
so no vLLM engine competes for the two cores; Ingest, Retrieve and Stats serve as usual.
`vllm_serve` starts an OpenAI-compatible `vllm serve` for the remote-backend measurements.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfresh.core.net import free_port

NO_GENERATION = {
    "generation.backend": "remote",
    "generation.remote_url": "http://127.0.0.1:9",
    "generation.remote_timeout_s": 1,
}


@dataclass
class Target:
    addr: str
    pid: int | None = None  # None: an external server given by --addr
    home: Path | None = None
    log: Path | None = None
    ready_s: float = 0.0


def client_options() -> dict[str, Any]:
    """Token / TLS for the bench's clients from the `client` settings (KFRESH_CLIENT__*, kfresh.toml), if this
    kfresh has them; a server the bench starts reads the same kfresh.toml."""
    try:
        from kfresh.client import connect_options
        from kfresh.core.config import load_config

        return {k: v for k, v in connect_options(load_config().client).items() if v is not None}
    except (ImportError, AttributeError):
        return {}


def client(addr: str) -> Any:
    """A blocking KfreshClient for `addr` with the configured credentials."""
    from kfresh.client import KfreshClient

    return KfreshClient(addr, **client_options())


def aclient(addr: str) -> Any:
    """An AsyncKfreshClient for `addr` with the configured credentials."""
    from kfresh.client import AsyncKfreshClient

    return AsyncKfreshClient(addr, **client_options())


def flags(settings: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in settings.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def home_settings(port: int, home: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A test server's settings: its port, every file under `home`, quiet logs; then `settings` on top."""
    return {"server.port": port, "store.path": home / "kfresh.db", "index.snapshot_dir": home / "index",
            "finetune.registry_dir": home / "adapters", "finetune.work_dir": home / "distill",
            "server.log_level": "WARNING", **settings}  # fmt: skip


@contextlib.contextmanager
def kfresh_server(
    settings: Mapping[str, Any] | None = None, *, addr: str | None = None, home: Path | None = None,
    model: bool = False, timeout_s: float = 900.0, env: Mapping[str, str] | None = None, remove_home: bool | None = None,
) -> Iterator[Target]:  # fmt: skip
    """Yield a ready server: `addr` as is, or a `kfresh serve` on a free port with data under `home` (temp if None).

    `model=True` waits for the model too (health service ""), else only for the index (kfresh.v1.Kfresh).
    The home is deleted afterwards when this made it or `remove_home` says so (a preloaded copy of a
    1M-document store is GBs: a suite's temporary homes must not pile up in /tmp).
    """
    from kfresh.client import SERVICE_NAME

    if addr:
        with client(addr) as c:
            c.wait_ready(timeout=timeout_s, service=SERVICE_NAME if not model else "")
        yield Target(addr)
        return
    owned = home is None if remove_home is None else remove_home
    home = Path(tempfile.mkdtemp(prefix="kfresh-bench-")) if home is None else home
    port = free_port()
    merged = home_settings(port, home, settings or {})
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "kfresh.cli", "serve", *flags(merged)]
    child_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    started = time.perf_counter()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    target = Target(f"127.0.0.1:{port}", proc.pid, home, log_path)
    try:
        _wait(proc, target, service=SERVICE_NAME, timeout_s=timeout_s)
        if model:
            _wait(proc, target, service="", timeout_s=timeout_s)
        target.ready_s = time.perf_counter() - started
        yield target
    finally:
        stop_group(proc)
        if owned:
            shutil.rmtree(home, ignore_errors=True)


class Replica:
    """A `kfresh serve` that can be killed, paused and started again on the same port and home (fault tests):
    its own process group, its log appended to home/server.log across starts."""

    def __init__(self, settings: Mapping[str, Any], home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.settings = home_settings(self.port, home, settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self, timeout_s: float = 300.0) -> float:
        """Start it and wait until the index serves; returns the seconds that took."""
        from kfresh.client import SERVICE_NAME

        self.home.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        with (self.home / "server.log").open("ab") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "kfresh.cli", "serve", *flags(self.settings)],
                                         stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        _wait(self.proc, Target(self.addr, self.proc.pid, self.home, self.home / "server.log"), service=SERVICE_NAME,
              timeout_s=timeout_s)  # fmt: skip
        return time.perf_counter() - started

    def kill(self) -> None:
        """SIGKILL the process group (no shutdown of any kind) and reap it."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc, self.paused = None, False

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets and its store connections but answers nothing."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            stop_group(self.proc)
            self.proc = None


def _wait(proc: subprocess.Popen[bytes], target: Target, *, service: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with client(target.addr) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kfresh serve exited with {proc.returncode}:\n{tail(target.log)}")
            try:
                c.wait_ready(timeout=2, service=service)
                return
            except TimeoutError:
                continue
    raise TimeoutError(f"kfresh serve not ready after {timeout_s:.0f} s:\n{tail(target.log)}")


@contextlib.contextmanager
def vllm_serve(model_path: str, *, dtype: str = "bfloat16", timeout_s: float = 300.0) -> Iterator[str]:
    """`vllm serve` (OpenAI API) on a free loopback port with the server's default engine settings; yields its URL."""
    import httpx

    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="kfresh-bench-vllm-")) / "vllm.log"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="2",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", "SmolLM2-135M-Instruct", "--host", "127.0.0.1", "--port", str(port),
           "--enforce-eager", "--dtype", dtype, "--max-model-len", "2048"]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s:\n{tail(log_path)}")
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (no shutdown of any kind) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (engine children too), SIGKILL after 60 s."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
