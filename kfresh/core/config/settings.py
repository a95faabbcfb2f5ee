"""All settings together, and how they load: defaults < kfresh.toml < KFRESH_* env < CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from kfresh.core.config.answering import AnswerConfig, AnswerLogConfig, FinetuneConfig, GenerationConfig
from kfresh.core.config.data import (
    EmbedderConfig,
    IndexConfig,
    ModelsConfig,
    ReplicationConfig,
    RetrievalConfig,
    StoreConfig,
)
from kfresh.core.config.service import ClientConfig, MetricsConfig, NatsConfig, ServerConfig


class KfreshConfig(BaseSettings):
    """All of kfresh's settings."""

    model_config = SettingsConfigDict(
        env_prefix="KFRESH_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    answer: AnswerConfig = Field(default_factory=AnswerConfig)
    answer_log: AnswerLogConfig = Field(default_factory=AnswerLogConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    nats: NatsConfig = Field(default_factory=NatsConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = Path(os.environ.get("KFRESH_CONFIG", "kfresh.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    def with_home(self, home: Path) -> KfreshConfig:
        """Return a copy whose data paths (db, snapshots, models) live under `home`."""
        data = self.model_dump()
        data["store"]["path"] = home / "kfresh.db"
        data["index"]["snapshot_dir"] = home / "index"
        if "://" not in data["index"]["milvus_uri"]:  # a milvus-lite file moves with the data; a server stays
            data["index"]["milvus_uri"] = str(home / "milvus.db")
        data["finetune"]["registry_dir"] = home / "adapters"
        data["finetune"]["work_dir"] = home / "distill"
        return KfreshConfig.model_validate(data)


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


def load_config(overrides: dict[str, Any] | None = None) -> KfreshConfig:
    """Build the config from all sources; `overrides` maps 'section.field' to a value (CLI flags)."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.partition(".")
        nested.setdefault(section, {})[field] = value
    try:
        base = KfreshConfig()
        if not nested:
            return base
        merged = base.model_dump()
        for section, fields in nested.items():
            if section not in merged:
                raise ConfigError(f"unknown config section {section!r}")
            merged[section].update(fields)
        return KfreshConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"setting {where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid kfresh configuration:\n  " + "\n  ".join(lines)
