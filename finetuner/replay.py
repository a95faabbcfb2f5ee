"""The replay pool: the base model's own greedy outputs, which the KL penalty keeps the adapter close to.

No external data set is needed: what must not change is the base model's behaviour, so its own answers
are the targets. The pool mixes (FIELD-NOTES, best measured recipe) general chat answers, answers to
questions about REAL entities asked in the same templates as the new facts (so the adapter does not
learn "answer this template with an invented name"), and plain-text continuations (perplexity).
Generation is slow on a CPU, so outputs are cached per base-model hash and only missing ones generated.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kfresh.finetuner import datasets
from kfresh.finetuner.augment import anchor_questions
from kfresh.finetuner.modeling import LoadedModel, chat_answers, greedy_generate, render_prompt
from kfresh.prompt import closed_book_messages

log = logging.getLogger("kfresh.finetuner")
COMPLETION_TOKENS = 32


@dataclass(frozen=True)
class ReplayItem:
    kind: str  # "chat" | "anchor" | "text"
    prompt: str  # the question, or the text opening
    completion: str  # the base model's greedy output

    def sequence(self, tokenizer: object) -> str:
        """The full text the KL penalty runs over: the chat prompt as served, or plain text."""
        if self.kind == "text":
            return f"{self.prompt} {self.completion}"
        return render_prompt(tokenizer, closed_book_messages(self.prompt)) + self.completion


def candidates() -> list[tuple[str, str]]:
    """Every replay prompt, interleaved by kind so that any prefix of the list is a balanced mix."""
    kinds = [
        ("chat", list(datasets.replay_prompts())),
        ("anchor", anchor_questions(datasets.anchor_subjects())),
        ("text", list(datasets.text_prompts())),
    ]
    tagged = [((i + 0.5) / len(items), kind, p) for kind, items in kinds for i, p in enumerate(items)]
    return [(kind, p) for _, kind, p in sorted(tagged, key=lambda t: t[0])]


def build_pool(lm: LoadedModel, cache_dir: Path, base_sha256: str, *, limit: int | None = None) -> list[ReplayItem]:
    """The first `limit` candidates (all by default) with the base model's outputs, from cache where possible.

    Call it before any adapter is attached: the outputs must be the base model's.
    """
    wanted = candidates()[:limit] if limit else candidates()
    cache_path = cache_dir / f"replay-{base_sha256[:16]}.jsonl"
    cached = _read_cache(cache_path)
    missing = [(k, p) for k, p in wanted if (k, p) not in cached]
    if missing:
        log.info("replay.generate missing=%d cached=%d", len(missing), len(cached))
        chats = [(k, p) for k, p in missing if k != "text"]
        texts = [(k, p) for k, p in missing if k == "text"]
        outs = chat_answers(lm, [closed_book_messages(p) for _, p in chats], max_new_tokens=COMPLETION_TOKENS,
                            desc="replay: base answers")  # fmt: skip
        outs += greedy_generate(lm, [p for _, p in texts], max_new_tokens=COMPLETION_TOKENS, desc="replay: base text")
        fresh = {kp: out for kp, out in zip(chats + texts, outs)}
        cached.update(fresh)
        _append_cache(cache_path, fresh)
    return [ReplayItem(k, p, cached[(k, p)]) for k, p in wanted]


def _read_cache(path: Path) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                out[(row["kind"], row["prompt"])] = row["completion"]
            except (ValueError, KeyError):
                continue  # a line torn by a crash: regenerate that one
    return out


def _append_cache(path: Path, rows: dict[tuple[str, str], str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for (kind, prompt), completion in rows.items():
            fh.write(json.dumps({"kind": kind, "prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
