"""A gRPC server under test, running on the session engine loop (shared with the vLLM engine)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc

from kfresh.core.config import KfreshConfig
from kfresh.server.app import running_server


class ServerHandle:
    """A server running on the engine's loop thread until stop() is called."""

    def __init__(self, loop_runner: Any, cfg: KfreshConfig, backend: Any) -> None:
        self._runner = loop_runner
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.port = 0
        self.runtime: Any = None
        self.metrics_port = 0
        self._task = asyncio.run_coroutine_threadsafe(self._main(cfg, backend), loop_runner.loop)
        if not self._ready.wait(120):
            self._task.result(timeout=1)
            raise TimeoutError("server did not start")

    async def _main(self, cfg: KfreshConfig, backend: Any) -> None:
        self._stop = asyncio.Event()
        async with running_server(cfg, backend=backend) as srv:
            self.port = srv.port
            self.runtime = srv.runtime
            self.metrics_port = srv.metrics_port
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        assert self._stop is not None
        self._runner.loop.call_soon_threadsafe(self._stop.set)
        self._task.result(timeout=60)


def server_config(tmp: Path, **over: Any) -> KfreshConfig:
    """Defaults with data under `tmp`, port 0, short answers; `section__field=value` overrides."""
    cfg = KfreshConfig().with_home(tmp)
    data = cfg.model_dump()
    data["server"]["port"] = 0
    data["metrics"]["port"] = 0
    data["answer"]["max_tokens"] = 40
    for dotted, value in over.items():
        section, field = dotted.split("__")
        data[section][field] = value
    return KfreshConfig.model_validate(data)


def answer_once(client: Any, question: str, **options: Any) -> tuple[str, Any]:
    """One Answer call: the concatenated deltas and the final AnswerDone."""
    text, done = [], None
    for event in client.answer(question, timeout=120, **options):
        if event.HasField("done"):
            done = event.done
        else:
            text.append(event.delta)
    assert done is not None, "stream ended without the final message"
    return "".join(text), done


def token_server(loop_runner: Any, backend: Any, tmp: Path, tokens: str, **over: Any) -> ServerHandle:
    """A server whose token file (under `tmp`) holds `tokens` (`TOKEN SCOPES [KEY=VALUE]` lines)."""
    path = tmp / "tokens"
    path.write_text(tokens)
    return ServerHandle(loop_runner, server_config(tmp, server__auth_tokens_file=path, **over), backend)


def store_bytes(server: ServerHandle) -> bytes:
    """Every byte of the server's SQLite store files (the database, its WAL and shared memory)."""
    db = Path(server.runtime.cfg.store.path)
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def status_of(call: Any) -> grpc.StatusCode:
    """The status a client call ends with (a stream is read to its end); OK when it succeeds."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
