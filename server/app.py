"""Server lifecycle: bind, load the index, load the model in the background, serve, drain on SIGTERM."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kfresh.config import KfreshConfig
from kfresh.server.adapters import AdapterManager
from kfresh.server.generation.base import GenerationBackend
from kfresh.server.servicer import KfreshServicer, Runtime
from kfresh.v1 import kfresh_pb2, kfresh_pb2_grpc

log = logging.getLogger("kfresh.server")

SERVICE_NAME = kfresh_pb2.DESCRIPTOR.services_by_name["Kfresh"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """Handle given to callers (tests use port 0 and read the bound port here)."""

    port: int
    address: str
    runtime: Runtime
    health: health.aio.HealthServicer
    model_task: asyncio.Task[None]

    async def wait_model(self) -> None:
        await asyncio.shield(self.model_task)


def _grpc_options(cfg: KfreshConfig) -> list[tuple[str, int]]:
    limit = cfg.server.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
    ]


async def _load_model(
    backend: GenerationBackend, health_servicer: health.aio.HealthServicer, adapters: AdapterManager | None
) -> None:
    """Start the backend (unless a shared one is already up), serve the registry's adapter, then SERVING."""
    if not backend.ready:
        try:
            await backend.start()
        except Exception:
            log.exception("generation backend failed to start; Answer stays UNAVAILABLE")
            return
        log.info("model_ready backend=%s model=%s", backend.name, backend.model)
    if adapters is not None:
        try:
            version = await adapters.sync()
            log.info("adapter_ready version=%s", version or "base")
        except Exception:  # noqa: BLE001 - a broken registry must not keep the base model from serving
            log.exception("adapter_sync_failed; serving the base model")
        adapters.start_watcher()
    await health_servicer.set("", SERVING)


def _adapter_manager(cfg: KfreshConfig, backend: GenerationBackend) -> AdapterManager | None:
    if not cfg.generation.enable_lora:
        return None
    from kfresh.finetuner.registry import AdapterRegistry

    registry = AdapterRegistry(cfg.finetune.registry_dir)
    return AdapterManager(registry, backend, poll_interval_s=cfg.generation.adapter_poll_s)


@contextlib.asynccontextmanager
async def running_server(
    cfg: KfreshConfig, *, backend: GenerationBackend | None = None, indexer: object | None = None
) -> AsyncIterator[RunningServer]:
    """Start a server; yields once retrieval and ingestion are ready (the model may still be loading).

    `backend` / `indexer` let tests share one engine or index; when given they are not shut down here.
    """
    from kfresh.indexer.service import Indexer
    from kfresh.server.generation.factory import create_backend

    owns_backend = backend is None
    backend = backend or create_backend(cfg)
    adapters = _adapter_manager(cfg, backend)
    runtime = Runtime(cfg, backend, adapters=adapters)
    server = grpc.aio.server(options=_grpc_options(cfg))
    kfresh_pb2_grpc.add_KfreshServicer_to_server(KfreshServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.server.host}:{cfg.server.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}: is the port in use?")
    await health_servicer.set("", NOT_SERVING)
    await health_servicer.set(SERVICE_NAME, NOT_SERVING)
    await server.start()
    log.info("listening address=%s:%d", cfg.server.host, port)

    owns_indexer = indexer is None
    idx = indexer if indexer is not None else Indexer(cfg)
    model_task: asyncio.Task[None] | None = None
    try:
        if owns_indexer:
            await asyncio.to_thread(idx.start)  # type: ignore[attr-defined]
        runtime.attach_indexer(idx)  # type: ignore[arg-type]
        await health_servicer.set(SERVICE_NAME, SERVING)
        if backend.ready and adapters is None:
            await health_servicer.set("", SERVING)
        model_task = asyncio.create_task(_load_model(backend, health_servicer, adapters))
        yield RunningServer(port, f"{cfg.server.host}:{port}", runtime, health_servicer, model_task)
    finally:
        log.info("shutting_down grace_s=%.1f", cfg.server.grace_s)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(cfg.server.grace_s)
        if model_task is not None and not model_task.done():
            model_task.cancel()
        if adapters is not None:
            # A shared backend outlives this server: take this server's adapters out of it.
            await adapters.close(unload=not owns_backend)
        if owns_backend:
            await backend.shutdown()
        if owns_indexer:
            await asyncio.to_thread(idx.close)  # type: ignore[attr-defined]
        log.info("stopped")


async def serve(cfg: KfreshConfig) -> None:
    """Run until SIGTERM/SIGINT; then NOT_SERVING, drain in-flight calls, close the store."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_server(cfg) as srv:
        print(f"kfresh serving on {srv.address}", flush=True)
        await stop.wait()
