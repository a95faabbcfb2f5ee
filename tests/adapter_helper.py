"""Synthetic LoRA adapters for the real generator: peft on the real model folder, random non-zero B weights.

peft initialises B to zero (an adapter that changes nothing); these get large random A and B so that
an adapter visibly changes greedy output, which is what the serving tests need to tell adapters apart.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(model_path: str, out_dirs: Sequence[Path], *, rank: int = 8, scale: float = 0.05, seed: int = 0) -> list[Path]:
    """Write one adapter per folder (different random weights each), loading the base model once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    for out in out_dirs:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(out))
    return [Path(p) for p in out_dirs]
