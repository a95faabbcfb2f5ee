"""Pick the generation backend named by the config."""

from __future__ import annotations

from kfresh.core.config import KfreshConfig
from kfresh.server.generation.base import GenerationBackend


def create_backend(cfg: KfreshConfig) -> GenerationBackend:
    """An unstarted backend for `cfg.generation.backend`; the vllm one gets a provisioned local model."""
    gen = cfg.generation
    if gen.backend == "remote":
        from kfresh.server.generation.balanced import BalancedRemoteBackend
        from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

        # One URL goes through the balancer too: its health watcher reloads the served adapters into a
        # vLLM server that restarted (runtime-loaded LoRAs do not survive a restart).
        urls = [u.strip() for u in gen.remote_url.split(",") if u.strip()]

        replicas = [OpenAIRemoteBackend(gen.model_copy(update={"remote_url": u}), start_timeout_s=2.0, poll_interval_s=0.25)
                    for u in urls]  # fmt: skip
        return BalancedRemoteBackend(gen, replicas, urls)
    if gen.backend == "vllm":
        from kfresh.models import generator_path
        from kfresh.server.generation.vllm_engine import VllmEngineBackend

        name = cfg.models.generator
        served = name.removeprefix("packaged:") if name.startswith("packaged:") else None
        return VllmEngineBackend(gen, generator_path(cfg.models), served_model_name=served)
    raise ValueError(f"unknown generation backend {gen.backend!r}")
