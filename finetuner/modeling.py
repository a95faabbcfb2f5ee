"""The base model for training and evaluation: loading, hashing, chat rendering, batched greedy generation.

Float32 throughout: bf16 greedy output depends on the batch composition (FIELD-NOTES), and the gate
compares texts generated in batches, so it needs batch-invariant numbers. torch, transformers and peft
are imported lazily so every finetuner module imports on a box without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kfresh.finetuner")

Messages = list[dict[str, str]]


@dataclass
class LoadedModel:
    """A causal LM (possibly wrapped by peft) with its tokenizer and device."""

    model: Any
    tokenizer: Any
    device: str
    path: str


def require_training_stack() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"distillation needs torch, transformers and peft: pip install 'peft==0.21.2' ({exc})"
        ) from exc


def resolve_device(preference: str) -> str:
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device is 'cuda' but torch sees no CUDA device")
    return preference


def load_base(path: str, *, device: str) -> LoadedModel:
    """The generator in float32, in eval mode, with a tokenizer that pads on the left (for generation)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_training_stack()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs type .to() as a decorator's wrapper
    model.eval()
    return LoadedModel(model, tokenizer, device, path)


def model_sha256(path: str) -> str:
    """sha256 over the model folder's weight files (names and contents): which base an adapter fits."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return hashlib.sha256(str(path).encode()).hexdigest()  # a hub name: the name is all we know
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The chat prompt up to and including the assistant header, exactly as the chat template renders it."""
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def greedy_generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """Greedy completions of rendered prompts, batched by length (left padding), in input order."""
    import torch
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        enc = tok([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(lm.device) for k, v in enc.items()}
        with torch.no_grad():
            gen = lm.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            out[i] = text.strip()
    return out


def chat_answers(
    lm: LoadedModel, conversations: Sequence[Messages], *, max_new_tokens: int = 32, desc: str | None = None
) -> list[str]:
    prompts = [render_prompt(lm.tokenizer, m) for m in conversations]
    return greedy_generate(lm, prompts, max_new_tokens=max_new_tokens, desc=desc)
