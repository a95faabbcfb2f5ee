"""Typed configuration: one model per component, loaded from defaults < kfresh.toml < KFRESH_* env < CLI.

Environment variables use `__` between section and field: `KFRESH_GENERATION__BACKEND=remote`.
A TOML file is read from `$KFRESH_CONFIG` or `./kfresh.toml` when present.
"""

from __future__ import annotations

from kfresh.core.config.answering import AnswerConfig, AnswerLogConfig, FinetuneConfig, GenerationConfig
from kfresh.core.config.data import (
    EmbedderConfig,
    IndexConfig,
    ModelsConfig,
    ReplicationConfig,
    RetrievalConfig,
    StoreConfig,
)
from kfresh.core.config.section import DEFAULT_HOME
from kfresh.core.config.service import ClientConfig, MetricsConfig, NatsConfig, ServerConfig
from kfresh.core.config.settings import ConfigError, KfreshConfig, load_config

__all__ = [
    "DEFAULT_HOME",
    "AnswerConfig",
    "AnswerLogConfig",
    "ClientConfig",
    "ConfigError",
    "EmbedderConfig",
    "FinetuneConfig",
    "GenerationConfig",
    "IndexConfig",
    "KfreshConfig",
    "MetricsConfig",
    "ModelsConfig",
    "NatsConfig",
    "ReplicationConfig",
    "RetrievalConfig",
    "ServerConfig",
    "StoreConfig",
    "load_config",
]
