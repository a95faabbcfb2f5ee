from __future__ import annotations

from pathlib import Path

import pytest

from kfresh.core.config import ConfigError, KfreshConfig, load_config


def test_defaults_fit_a_cpu_box() -> None:
    cfg = load_config()
    assert cfg.generation.backend == "vllm"
    assert cfg.index.kind == "auto"  # exact while small, IVF with a measured nprobe past ivf_train_min
    assert cfg.server.host == "127.0.0.1"


def test_env_toml_and_flags_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "kfresh.toml"
    toml.write_text("[retrieval]\ndefault_k = 7\nmax_k = 50\n[server]\nport = 6000\n")
    monkeypatch.setenv("KFRESH_CONFIG", str(toml))
    monkeypatch.setenv("KFRESH_SERVER__PORT", "6001")
    cfg = load_config({"retrieval.max_k": "40"})
    assert cfg.retrieval.default_k == 7  # from the file
    assert cfg.server.port == 6001  # env beats the file
    assert cfg.retrieval.max_k == 40  # flags beat everything


def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="embedder.batch_size"):
        load_config({"embedder.batch_size": "0"})
    monkeypatch.setenv("KFRESH_GENERATION__BACKEND", "tgi")
    with pytest.raises(ConfigError, match="generation.backend"):
        load_config()


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="nonsense"):
        load_config({"server.nonsense": "1"})
    with pytest.raises(ConfigError, match="section"):
        load_config({"nosuch.field": "1"})


def test_with_home_moves_data_paths(tmp_path: Path) -> None:
    cfg = KfreshConfig().with_home(tmp_path)
    assert cfg.store.path == tmp_path / "kfresh.db"
    assert cfg.index.snapshot_dir == tmp_path / "index"
