"""The health service's "" status follows the generation model after it first loaded.

`kfresh.v1.Kfresh` reports the index; "" reports that Answer can be served too. A remote vLLM server
can go down and come back long after start, so once the model is up this task probes the backend every
`generation.remote_health_interval_s` and flips "" between SERVING and NOT_SERVING. A load balancer or a
Kubernetes readiness probe on "" then stops sending chatbots to a server whose answers would fail, while
one on `kfresh.v1.Kfresh` keeps ingest and retrieval traffic flowing.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from kfresh.server.generation.base import GenerationBackend

log = logging.getLogger("kfresh.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def follow_model_health(
    backend: GenerationBackend, servicer: health.aio.HealthServicer, loaded: asyncio.Task[None], *, interval_s: float
) -> None:
    """Wait for the model's first load (`loaded` sets SERVING itself), then mirror the backend's health."""
    try:
        await asyncio.shield(loaded)
    except Exception:
        return
    if not backend.ready:
        return  # an in-process engine that failed to start stays NOT_SERVING
    serving = True
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = await asyncio.wait_for(backend.serving(), timeout=max(interval_s, 1.0))
        except Exception:
            now = False
        if now != serving:
            serving = now
            await servicer.set("", SERVING if now else NOT_SERVING)
            log.warning("model_health serving=%s backend=%s model=%s", now, backend.name, backend.model)
