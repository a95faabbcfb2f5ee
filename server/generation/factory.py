"""Pick the generation backend named by the config."""
from __future__ import annotations

from kfresh.config import KfreshConfig
from kfresh.server.generation.base import GenerationBackend


def create_backend(cfg: KfreshConfig) -> GenerationBackend:
    """An unstarted backend for `cfg.generation.backend`; the vllm one gets a provisioned local model."""
    gen = cfg.generation
    if gen.backend == "remote":
        from kfresh.server.generation.openai_remote import OpenAIRemoteBackend

        return OpenAIRemoteBackend(gen)
    if gen.backend == "vllm":
        from kfresh.models import generator_path
        from kfresh.server.generation.vllm_engine import VllmEngineBackend

        name = cfg.models.generator
        served = name.removeprefix("packaged:") if name.startswith("packaged:") else None
        return VllmEngineBackend(gen, generator_path(cfg.models), served_model_name=served)
    raise ValueError(f"unknown generation backend {gen.backend!r}")
