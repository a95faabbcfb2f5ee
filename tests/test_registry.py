"""The adapter registry: atomic versions, CURRENT pointer, promote/rollback, sha256 verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfresh.core.errors import InvalidInput, NotFound
from kfresh.finetuner.registry import AdapterRegistry


def _adapter(tmp: Path, name: str, payload: bytes) -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def _publish(reg: AdapterRegistry, folder: Path, **kw: object) -> object:
    return reg.publish(folder, base_model="m", base_model_sha256="b", training_data_sha256="d", gate_passed=True, **kw)  # type: ignore[arg-type]


def test_publish_versions_and_pointer(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.current() is None and reg.list() == []
    v1 = _publish(reg, _adapter(tmp_path, "a", b"one"), metrics={"recall": 0.9}, facts=3)
    v2 = _publish(reg, _adapter(tmp_path, "b", b"two"))
    assert (v1.version, v2.version) == ("v0001", "v0002")  # type: ignore[attr-defined]
    assert v2.parent == "v0001" and v1.parent is None  # type: ignore[attr-defined]
    assert reg.current().version == "v0002"  # type: ignore[union-attr]
    assert reg.get("v0001").metrics == {"recall": 0.9} and reg.get("v0001").facts == 3
    assert reg.get("v0002").served_name == "kfresh-v0002"
    assert not list((tmp_path / "reg").glob(".*")), "no staging leftovers"


def test_rollback_walks_back_to_the_base_model(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    _publish(reg, _adapter(tmp_path, "a", b"one"))
    _publish(reg, _adapter(tmp_path, "b", b"two"))
    assert reg.rollback().version == "v0001"  # type: ignore[union-attr]
    assert reg.current().version == "v0001"  # type: ignore[union-attr]
    assert reg.rollback() is None and reg.current() is None
    assert reg.promote("v0002").version == "v0002"


def test_only_gate_passing_adapters_are_published(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(InvalidInput, match="gate"):
        reg.publish(
            _adapter(tmp_path, "a", b"x"),
            base_model="m",
            base_model_sha256="b",
            training_data_sha256="d",
            gate_passed=False,
        )
    assert reg.list() == []


def test_tampered_weights_are_refused_and_unknown_versions_not_found(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    _publish(reg, _adapter(tmp_path, "a", b"one"))
    assert reg.verified_dir("v0001").is_dir()
    (reg.adapter_dir("v0001") / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(InvalidInput, match="sha256"):
        reg.verified_dir("v0001")
    with pytest.raises(InvalidInput):
        reg.promote("v0001")
    with pytest.raises(NotFound):
        reg.get("v0042")


def test_an_adapter_without_weights_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="no adapter weights"):
        _publish(AdapterRegistry(tmp_path / "reg"), empty)
