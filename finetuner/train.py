"""LoRA training of facts against forgetting: answer-only cross-entropy + KL toward the base on replay.

The recipe is the best one measured (FIELD-NOTES, "Knowledge into LoRA without forgetting"): LoRA on all
linear layers, AdamW without weight decay, warm-up then linear decay, clipping 1.0; each step takes a
batch of fact Q/A examples (loss on the answer tokens only: the facts, not the prompt style) and as many
replay sequences, on which KL(adapter || base) over every position keeps the model's behaviour.
Context examples (the server's retrieval prompt with a passage, most of them contradicting the trained
value; loss on the answer, which follows the passage) keep the adapter from overriding fresher documents.
Stopping: once (nearly) every validation answer's object is reproduced, the rate decays to zero over
`anneal_epochs` more epochs and training ends (the KL penalty repairs at a low rate what the peak rate
broke); without that, validation loss with patience stops it and restores the best epoch. The time
budget is hard: no step starts that would end after it, and the decay is re-planned to end at the budget.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfresh.core.config import FinetuneConfig
from kfresh.finetuner.augment import QA, AugmentedFacts, passage_hit
from kfresh.finetuner.facts import Fact
from kfresh.finetuner.modeling import LoadedModel, render_prompt
from kfresh.finetuner.replay import ReplayItem
from kfresh.prompt import build_messages, closed_book_messages

log = logging.getLogger("kfresh.finetuner")
MAX_REPLAY_TOKENS = 96
PATIENCE = 2  # epochs without a better validation loss before stopping (the best epoch is restored)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    object_positions: list[int] = field(default_factory=list)  # label positions of the fact's object tokens


@dataclass
class EpochMetrics:
    epoch: int
    steps: int
    train_ce: float
    train_kl: float
    val_loss: float
    val_object_acc: float
    seconds: float


@dataclass
class TrainResult:
    adapter_dir: Path
    epochs: list[EpochMetrics]
    steps: int
    seconds: float
    stopped: str  # "learned_and_annealed" | "early_stop" | "max_epochs" | "time_budget"
    best_epoch: int
    device: str
    train_tokens: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapter_dir"] = str(self.adapter_dir)
        return out


def encode_qa(tokenizer: Any, qa: QA, obj: str | None = None, facts: Sequence[Fact] = ()) -> Encoded:
    """Chat prompt (as the server renders it) + answer + end-of-turn; labels on the answer only.

    Closed-book, or with `qa.passage` as the retrieved passage of the fact's document (`facts[qa.fact]`).
    """
    if qa.passage:
        messages = build_messages(qa.question, [passage_hit(facts[qa.fact], qa.passage)])
    else:
        messages = closed_book_messages(qa.question)
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_text = qa.answer + tokenizer.eos_token + "\n"
    enc = tokenizer(answer_text, add_special_tokens=False, return_offsets_mapping=True)
    answer = enc["input_ids"]
    positions: list[int] = []
    if obj and obj in qa.answer:
        start = qa.answer.index(obj)
        end = start + len(obj)
        positions = [len(prompt) + i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return Encoded(prompt + answer, [-100] * len(prompt) + answer, positions)


def encode_replay(tokenizer: Any, item: ReplayItem) -> Encoded:
    ids = tokenizer(item.sequence(tokenizer), add_special_tokens=False)["input_ids"][:MAX_REPLAY_TOKENS]
    return Encoded(ids, list(ids))


def _batch(items: Sequence[Encoded], pad_id: int, device: str) -> dict[str, Any]:
    """Right-padded tensors (training needs no generation, so right padding keeps positions simple)."""
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in items]
    labels = [e.labels + [-100] * (width - len(e.labels)) for e in items]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in items]
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "labels": torch.tensor(labels, device=device),
    }


def kl_to_base(model: Any, batch: dict[str, Any]) -> Any:
    """Mean over real tokens of KL(adapter || base); base logits come from the same weights, adapter off."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), model.disable_adapter():
        base = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, dim=-1)
    adapted = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, dim=-1)
    per_token = (adapted.exp() * (adapted - base)).sum(-1)
    mask = batch["attention_mask"].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def attach_lora(lm: LoadedModel, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    lm.model = get_peft_model(lm.model, config)
    return lm.model


def train_adapter(
    lm: LoadedModel, data: AugmentedFacts, replay: Sequence[ReplayItem], cfg: FinetuneConfig, out_dir: Path
) -> TrainResult:
    """Train a LoRA adapter on `data.train` (+ replay), early-stopped on `data.validation`; save it to `out_dir`."""
    context = data.context[: cfg.context_examples * len(data.facts)]
    tok = lm.tokenizer
    train = [encode_qa(tok, qa, facts=data.facts) for qa in list(data.train) + context]
    val = [encode_qa(tok, qa, data.facts[qa.fact].object) for qa in data.validation]
    return train_encoded(lm, train, val, replay, cfg, out_dir, desc="distill: training")


def train_encoded(
    lm: LoadedModel,
    train: Sequence[Encoded],
    val: Sequence[Encoded],
    replay: Sequence[ReplayItem],
    cfg: FinetuneConfig,
    out_dir: Path,
    *,
    desc: str = "training",
) -> TrainResult:
    """The recipe on examples already encoded (labels on what is learned); early-stopped on `val`."""
    from tqdm.auto import tqdm

    run = _Trainer(lm, train, val, replay, cfg)
    bar = tqdm(total=run.planned, desc=desc, unit="step", leave=False)
    for epoch in range(1, cfg.max_epochs + 1):
        epoch_start = time.perf_counter()
        order = list(range(len(run.train)))
        run.rng.shuffle(order)
        losses: list[tuple[float, float]] = []
        for start in range(0, len(order), cfg.batch_size):
            if not run.budget_allows_a_step():
                run.stopped = "time_budget"
                break
            losses.append(run.step([run.train[i] for i in order[start : start + cfg.batch_size]]))
            bar.update(1)
            bar.set_postfix(epoch=epoch, ce=f"{losses[-1][0]:.3f}", kl=f"{losses[-1][1]:.4f}")
        if not losses or run.end_epoch(epoch, losses, epoch_start) or run.stopped == "time_budget":
            break
    bar.close()
    return run.finish(out_dir)


class _Trainer:
    """The state of one training run; `train_encoded` drives it epoch by epoch."""

    def __init__(
        self,
        lm: LoadedModel,
        train: Sequence[Encoded],
        val: Sequence[Encoded],
        replay: Sequence[ReplayItem],
        cfg: FinetuneConfig,
    ) -> None:
        import torch

        self.started = time.perf_counter()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.lm, self.cfg, self.tok = lm, cfg, lm.tokenizer
        self.model = attach_lora(lm, cfg)
        self.train, self.val = list(train), list(val)
        self.pool = [encode_replay(self.tok, item) for item in replay] if cfg.kl_weight > 0 else []
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=0.0)
        self.planned = cfg.max_epochs * math.ceil(len(self.train) / cfg.batch_size)
        self.steps = self.tokens = 0
        self.replay_order: list[int] = []
        self.best_loss, self.best_epoch = math.inf, 0
        self.best_state: dict[str, Any] | None = None
        self.val_seconds = 0.0
        self.anneal_end: int | None = None  # the step at which the rate reaches zero once the facts are learned
        self.epochs: list[EpochMetrics] = []
        self.stopped = "max_epochs"

    def budget_allows_a_step(self) -> bool:
        """Hard budget: a step (and the validation after it) must end before `time_budget_s`."""
        elapsed = time.perf_counter() - self.started
        if not self.steps:
            return True
        return elapsed + elapsed / self.steps + self.val_seconds <= self.cfg.time_budget_s

    def step(self, examples: list[Encoded]) -> tuple[float, float]:
        import torch

        elapsed = time.perf_counter() - self.started
        horizon = self.planned if self.anneal_end is None else self.anneal_end
        if self.steps:  # the decay ends where the budget does, if that comes first
            horizon = min(horizon, self.steps + int((self.cfg.time_budget_s - elapsed) / (elapsed / self.steps)))
        for group in self.optimizer.param_groups:
            group["lr"] = _rate(self.cfg, self.steps, horizon)
        self.model.train()
        facts = _batch(examples, self.tok.pad_token_id, self.lm.device)
        ce = self.model(**facts).loss
        kl = torch.zeros((), device=self.lm.device)
        if self.pool:
            replay = _batch(self._next_replay(), self.tok.pad_token_id, self.lm.device)
            kl = kl_to_base(self.model, replay)
            self.tokens += int(replay["attention_mask"].sum())
        self.optimizer.zero_grad(set_to_none=True)
        (ce + self.cfg.kl_weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.tokens += int(facts["attention_mask"].sum())
        self.steps += 1
        return float(ce.detach()), float(kl.detach())

    def end_epoch(self, epoch: int, losses: list[tuple[float, float]], epoch_start: float) -> bool:
        """Validate, remember the best epoch; True when training should stop."""
        val_start = time.perf_counter()
        val_loss, val_acc = evaluate_validation(self.model, self.val, self.tok.pad_token_id, self.lm.device)
        self.val_seconds = time.perf_counter() - val_start
        n = len(losses)
        self.epochs.append(EpochMetrics(
            epoch, n, round(sum(c for c, _ in losses) / n, 4), round(sum(k for _, k in losses) / n, 5),
            round(val_loss, 4), round(val_acc, 4), round(time.perf_counter() - epoch_start, 2),
        ))  # fmt: skip
        log.info("train.epoch %s", asdict(self.epochs[-1]))
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.named_parameters() if v.requires_grad}
        if self.anneal_end is not None and self.steps >= self.anneal_end:
            self.stopped = "learned_and_annealed"
            return True
        if self.anneal_end is None and val_acc >= self.cfg.learned_accuracy:
            self.anneal_end = self.steps + self.cfg.anneal_epochs * math.ceil(len(self.train) / self.cfg.batch_size)
            if not self.cfg.anneal_epochs:
                self.stopped = "learned_and_annealed"
                return True
        if self.anneal_end is None and epoch - self.best_epoch >= PATIENCE:
            self.stopped = "early_stop"
            return True
        return False

    def finish(self, out_dir: Path) -> TrainResult:
        """Save the adapter as peft writes it (vLLM loads this format); after a patience stop, the best epoch's.

        Every other stop ends with the rate decayed to (near) zero, whose weights are the ones to keep.
        """
        if self.stopped == "early_stop" and self.best_state is not None and self.best_epoch != self.epochs[-1].epoch:
            _restore(self.model, self.best_state)
        self.model.eval()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir), safe_serialization=True)
        (out_dir / "README.md").unlink(missing_ok=True)  # peft's model-card stub: not part of the adapter
        for path in out_dir.iterdir():
            path.chmod(0o644)  # safetensors are written private; the serving process may run as another user
        seconds = round(time.perf_counter() - self.started, 2)
        return TrainResult(
            out_dir, self.epochs, self.steps, seconds, self.stopped, self.best_epoch, self.lm.device, self.tokens
        )

    def _next_replay(self) -> list[Encoded]:
        out = []
        for _ in range(self.cfg.batch_size * self.cfg.replay_ratio):
            if not self.replay_order:
                self.replay_order = list(range(len(self.pool)))
                self.rng.shuffle(self.replay_order)
            out.append(self.pool[self.replay_order.pop()])
        return out


def _rate(cfg: FinetuneConfig, step: int, horizon: int) -> float:
    """Linear warm-up, then linear decay to zero at `horizon` (the last step that fits the budget)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(horizon - cfg.warmup_steps, 1)
    return cfg.learning_rate * max(0.0, (horizon - step) / span)


def evaluate_validation(model: Any, val: Sequence[Encoded], pad_id: int, device: str) -> tuple[float, float]:
    """(mean answer-token loss, share of examples whose object tokens are all predicted) under teacher forcing."""
    import torch
    import torch.nn.functional as F

    if not val:
        return 0.0, 0.0
    model.eval()
    total = tokens = 0.0
    hits = 0
    with torch.no_grad():
        for start in range(0, len(val), 16):
            chunk = val[start : start + 16]
            batch = _batch(chunk, pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            tokens += float((labels != -100).sum())
            predicted = logits.argmax(-1)
            for row, enc in enumerate(chunk):
                pos = [p - 1 for p in enc.object_positions]
                hits += bool(pos) and all(int(predicted[row, p]) == enc.input_ids[p + 1] for p in pos)
    return total / max(tokens, 1.0), hits / len(val)


def _restore(model: Any, best: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best:
                param.copy_(best[name])
