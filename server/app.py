"""Server lifecycle: bind, load the index, load the model in the background, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kfresh.core.config import ConfigError, KfreshConfig, ServerConfig
from kfresh.core.metrics import MetricsEndpoint
from kfresh.finetuner.scheduler import DistillScheduler
from kfresh.server.adapters import AdapterManager
from kfresh.server.auth import AuthInterceptor, TokenTable
from kfresh.server.errors import MalformedRequestGuard
from kfresh.server.generation.base import GenerationBackend
from kfresh.server.model_health import NOT_SERVING, SERVING, follow_model_health
from kfresh.server.servicer import KfreshServicer, Runtime
from kfresh.server.tls import server_credentials
from kfresh.server.withdrawal import WithdrawalWatch
from kfresh.v1 import kfresh_pb2, kfresh_pb2_grpc

log = logging.getLogger("kfresh.server")

SERVICE_NAME = kfresh_pb2.DESCRIPTOR.services_by_name["Kfresh"].full_name


@dataclass
class RunningServer:
    """Handle given to callers (tests use port 0 and read the bound port here)."""

    port: int
    address: str
    runtime: Runtime
    health: health.aio.HealthServicer
    model_task: asyncio.Task[None]
    metrics_port: int = 0  # 0 = metrics off (or their port was taken)

    async def wait_model(self) -> None:
        await asyncio.shield(self.model_task)


def _grpc_options(cfg: KfreshConfig) -> list[tuple[str, int]]:
    srv = cfg.server
    limit = srv.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(srv.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(srv.keepalive_timeout_s * 1000)),
        # Keepalive abuse: pings closer than this (or any ping on an idle connection unless permitted)
        # are strikes; past max_ping_strikes the server sends GOAWAY(too_many_pings) and closes.
        ("grpc.http2.min_ping_interval_without_data_ms", int(srv.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", srv.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(srv.keepalive_permit_without_calls)),
    ]


def _is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(srv: ServerConfig, *, auth: bool) -> None:
    """Refuse a non-loopback bind without authentication unless server.allow_insecure_public says so."""
    if _is_loopback(srv.host):
        return
    if not auth:
        if not srv.allow_insecure_public:
            raise ConfigError(
                f"server.host={srv.host} is not loopback and no authentication is configured: set "
                "server.auth_tokens_file (or KFRESH_SERVER__AUTH_TOKENS), bind 127.0.0.1, or set "
                "server.allow_insecure_public=true to serve anyone who can reach the port"
            )
        log.warning(
            "INSECURE: serving %s without authentication (server.allow_insecure_public=true): "
            "anyone who can reach the port can ingest, delete and promote adapters",
            srv.host,
        )
    if srv.tls_cert_file is None:
        log.warning(
            "serving %s without TLS: tokens and documents cross the network in plaintext (set server.tls_cert_file)",
            srv.host,
        )


def _interceptors(srv: ServerConfig, tokens: TokenTable) -> list[grpc.aio.ServerInterceptor]:
    """Authentication (when tokens are configured) first, then the malformed-request guard."""
    check_exposure(srv, auth=len(tokens) > 0)
    guard: list[grpc.aio.ServerInterceptor] = [MalformedRequestGuard()]
    if not tokens:
        return guard
    log.info("auth_enabled tokens=%d", len(tokens))
    return [AuthInterceptor(tokens), *guard]


async def _load_model(
    backend: GenerationBackend,
    health_servicer: health.aio.HealthServicer,
    adapters: AdapterManager | None,
    withdrawal: WithdrawalWatch | None = None,
) -> None:
    """Start the backend (unless a shared one is already up), serve the registry's adapter (withdrawing any that
    learned a document deleted or replaced meanwhile), then SERVING."""
    if not backend.ready:
        if not await _start_backend(backend):
            return
        log.info("model_ready backend=%s model=%s", backend.name, backend.model)
    if withdrawal is not None:  # first: an adapter that learned a document deleted while down is never served
        try:
            await withdrawal.start()
        except Exception:
            log.exception("adapter_withdrawal_start_failed: deleted documents do not withdraw adapters")
    if adapters is not None:
        try:
            version = await adapters.sync()
            log.info("adapter_ready version=%s", version or "base")
        except Exception:
            log.exception("adapter_sync_failed; serving the base model")
        adapters.start_watcher()
    await health_servicer.set("", SERVING)


async def _start_backend(backend: GenerationBackend) -> bool:
    """True once started. A remote server that is not up yet is retried with backoff (it may simply start
    after kfresh); a failed in-process engine is final. Answer is UNAVAILABLE meanwhile."""
    delay = 1.0
    while not backend.ready:
        try:
            await backend.start()
        except Exception as exc:
            if not backend.name.startswith("remote"):
                log.exception("generation backend failed to start; Answer is UNAVAILABLE")
                return False
            log.warning("generation_backend_down backend=%s error=%s: retrying in %.0f s", backend.name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    return True


def _adapter_manager(cfg: KfreshConfig, backend: GenerationBackend) -> AdapterManager | None:
    if not cfg.generation.enable_lora:
        return None
    from kfresh.finetuner.registry import AdapterRegistry

    registry = AdapterRegistry(cfg.finetune.registry_dir)
    return AdapterManager(registry, backend, poll_interval_s=cfg.generation.adapter_poll_s)


def _metrics_endpoint(cfg: KfreshConfig, indexer: Any) -> MetricsEndpoint | None:
    """Prometheus /metrics; a port already taken costs the metrics, not the service (logged loudly)."""
    if not cfg.metrics.enabled:
        return None
    try:
        endpoint = MetricsEndpoint(cfg.metrics.host, cfg.metrics.port)
    except OSError as exc:
        log.error("metrics_unavailable address=%s:%d error=%s: set --metrics.port or --metrics.enabled false",
                  cfg.metrics.host, cfg.metrics.port, exc)  # fmt: skip
        return None
    from kfresh.indexer.metrics import IndexerCollector

    endpoint.watch(IndexerCollector(indexer))
    return endpoint


def _withdrawal(
    cfg: KfreshConfig, adapters: AdapterManager | None, runtime: Runtime, idx: Any
) -> WithdrawalWatch | None:
    """Deletes through the weights: serve no adapter that learned a deleted or replaced document."""
    if adapters is None:
        return None

    async def withdrawn(stale: dict[str, str]) -> None:
        await adapters.sync()
        if runtime.distiller is not None:
            runtime.distiller.rebuild("withdrawn")

    return WithdrawalWatch(adapters.registry, idx, on_withdrawn=withdrawn, interval_s=cfg.generation.adapter_poll_s)


def _distiller(cfg: KfreshConfig, adapters: AdapterManager | None) -> DistillScheduler:
    """Distill RPC + schedule; a published adapter is served at once (the registry watcher would see it too)."""
    scheduler = DistillScheduler(cfg, on_published=adapters.sync if adapters is not None else None)
    scheduler.start()
    return scheduler


@contextlib.asynccontextmanager
async def running_server(
    cfg: KfreshConfig, *, backend: GenerationBackend | None = None, indexer: object | None = None
) -> AsyncIterator[RunningServer]:
    """Start a server; yields once retrieval and ingestion are ready (the model may still be loading).

    `backend` / `indexer` let tests share one engine or index; when given they are not shut down here.
    """
    from kfresh.indexer.service import Indexer
    from kfresh.server.generation.factory import create_backend

    tokens = TokenTable.from_config(cfg.server)
    interceptors = _interceptors(cfg.server, tokens)  # security settings fail before anything heavy starts
    credentials = server_credentials(cfg.server)
    owns_backend = backend is None
    backend = backend or create_backend(cfg)
    adapters = _adapter_manager(cfg, backend)
    runtime = Runtime(cfg, backend, adapters=adapters, tokens=tokens)
    server = grpc.aio.server(options=_grpc_options(cfg), interceptors=interceptors)
    kfresh_pb2_grpc.add_KfreshServicer_to_server(KfreshServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.server.host}:{cfg.server.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}: is the port in use?")
    await health_servicer.set("", NOT_SERVING)
    await health_servicer.set(SERVICE_NAME, NOT_SERVING)
    await server.start()
    tls = "mutual" if cfg.server.tls_client_ca_file else "on" if credentials else "off"
    log.info("listening address=%s:%d tls=%s auth=%s", cfg.server.host, port, tls, len(interceptors) > 1)

    owns_indexer = indexer is None
    idx = indexer if indexer is not None else Indexer(cfg)
    model_task: asyncio.Task[None] | None = None
    withdrawal: WithdrawalWatch | None = None
    health_task: asyncio.Task[None] | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    try:
        if owns_indexer:
            await asyncio.to_thread(idx.start)  # type: ignore[attr-defined]
        runtime.attach_indexer(idx)  # type: ignore[arg-type]
        runtime.distiller = _distiller(cfg, adapters)
        metrics_endpoint = _metrics_endpoint(cfg, idx)
        await health_servicer.set(SERVICE_NAME, SERVING)
        if backend.ready and adapters is None:
            await health_servicer.set("", SERVING)
        withdrawal = _withdrawal(cfg, adapters, runtime, idx)
        model_task = asyncio.create_task(_load_model(backend, health_servicer, adapters, withdrawal))
        health_task = asyncio.create_task(
            follow_model_health(
                backend, health_servicer, model_task, interval_s=cfg.generation.remote_health_interval_s
            )
        )
        yield RunningServer(port, f"{cfg.server.host}:{port}", runtime, health_servicer, model_task,
                            metrics_endpoint.port if metrics_endpoint else 0)  # fmt: skip
    finally:
        log.info("shutting_down grace_s=%.1f", cfg.server.grace_s)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(cfg.server.grace_s)
        for task in (health_task, model_task):
            if task is not None and not task.done():
                task.cancel()
        if withdrawal is not None:
            await withdrawal.close()
        if runtime.distiller is not None:
            await runtime.distiller.close()
        if runtime.answer_log is not None:
            await runtime.answer_log.close()
        runtime.close()
        if metrics_endpoint is not None:
            metrics_endpoint.close()
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
