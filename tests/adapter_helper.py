"""Synthetic LoRA adapters for the real generator, and an Answer load that records the adapter of each answer.

The adapters: peft on the real model folder, random non-zero B weights.

peft initialises B to zero (an adapter that changes nothing); these get large random A and B so that
an adapter visibly changes greedy output, which is what the serving tests need to tell adapters apart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from server_helper import answer_once

from kfresh.client import KfreshClient

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(
    model_path: str, out_dirs: Sequence[Path], *, rank: int = 8, scale: float = 0.05, seed: int = 0
) -> list[Path]:
    """Write one adapter per folder (different random weights each), loading the base model once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    for out in out_dirs:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(out))
    return [Path(p) for p in out_dirs]


class AnswerLoad:
    """Threads that keep asking until stopped; records the adapter of every answer and every error."""

    def __init__(self, addr: str, question: str, *, threads: int = 3, pause_s: float = 0.0) -> None:
        self._pause_s = pause_s
        self.seen: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(addr, question)) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, addr: str, question: str) -> None:
        with KfreshClient(addr) as client:
            while not self._stop.is_set():
                try:
                    _, done = answer_once(client, question, max_tokens=12)
                    with self._lock:
                        self.seen[done.adapter] += 1
                except BaseException as exc:
                    self.errors.append(exc)
                self._stop.wait(self._pause_s)

    def wait_for(self, version: str, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        start = self.seen[version]
        while self.seen[version] < start + count:
            assert time.monotonic() < deadline, f"no answers with {version!r}: {self.seen}"
            assert not self.errors, self.errors
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
