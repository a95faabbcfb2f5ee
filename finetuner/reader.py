"""The reader: a LoRA adapter trained RAFT-style to answer from the served prompt, merged into the generator.

Retrieval finds the evidence; the 135M model then misreads it (issue 18). RAFT (Zhang et al. 2024) trains a
reader on question + right passage + distractors -> answer. Here each row of a reading set (a question, its
short answer, the evidence passage and its date) becomes the server's own prompt (`kfresh.prompt.build_messages`,
the served layout): the evidence alone, or (a share `pair_share`) the evidence with the most similar other
passage of the set, both in date order as the server shows them. The target is the short answer. With
`refuse_share` (0 by default: measured, it refuses far too often), that share of rows is shown the two most
similar other passages WITHOUT the evidence, and its target is the server's "not in the documents" reply (RAFT's
distractor-only rows, with a refusal as the answer): what a retriever shows once the evidence is deleted or was
never there. The loss is
on the answer only, and KL toward the base model on the replay pool (`finetune.kl_weight`) keeps its general
behaviour (the distillation recipe, `finetuner.train.train_encoded`).

vLLM serves one LoRA per request, and the distilled-knowledge adapters need that slot, so the reader is not
served as an adapter: it is merged into the base weights (`merge`), and the merged folder becomes the
generator (`models.generator`). Distillation then starts from it like from any base model, and adapters
record its sha256. `kfresh provision --reader-data FILE` builds it once (kfresh.provisioning).

A reading set is JSONL; each row has `question`, `evidence`, `date` (YYYY-MM-DD or ISO time) and the answer as
`answer` (text) or as `choices` + `answer` (the index of the right choice, the RealTimeQA layout). Rows dated
after `until` are not read: train on the past, report on what comes after.
A row without `question` that has `text` is a document (a `kfresh ingest` JSONL line: `id`, `text`,
`valid_from`): it becomes up to `DOC_QUESTIONS` rows by itself, questions built by rule around its answer spans
(`transfer.candidates`: names, dates, numbers, quotes; the sentence with the span turned into a wh-phrase), the
span as the answer and the document as the evidence. So a reader can be built from a deployment's own
documents, with no questions written by anyone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kfresh.client.sources import SourceError, json_object, parse_time, read_text
from kfresh.core.config import FinetuneConfig, KfreshConfig
from kfresh.core.files import build_dir_once, sha256_file
from kfresh.finetuner.modeling import LoadedModel, Messages, render_prompt
from kfresh.finetuner.train import Encoded
from kfresh.indexer.documents import Hit
from kfresh.prompt import NOT_FOUND_REPLY, build_messages

log = logging.getLogger("kfresh.finetuner")
MANIFEST = "kfresh-reader.json"
RECIPE_VERSION = 2  # bump when the examples or the recipe change, so cached readers are rebuilt
# The distillation recipe with a gentler rate and a longer budget: reading is a skill over hundreds of rows,
# not a few facts, and no answer is ever "learned" (so early stopping on the validation loss ends it).
RECIPE: dict[str, Any] = {"learning_rate": 5e-4, "max_epochs": 2, "time_budget_s": 1500.0, "learned_accuracy": 1.0}
PAIR_SHARE = 0.3  # rows shown with their distractor
REFUSE_SHARE = 0.0  # rows shown with distractors only, answered with the "not in the documents" reply (off:
# at 0.2 the reader refused 46% of deleted-evidence questions but 32% with the evidence shown, README: Reading)
REFUSE_WITH = 2  # distractors shown on a refusal row
DOC_QUESTIONS = 3  # rows generated from one document of a reading set


class ReadingSetError(ValueError):
    """A reading-set row cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class ReadingRow:
    id: str
    question: str
    answer: str
    evidence: str
    valid_from: float
    source: str = ""

    def hit(self, score: float = 1.0) -> Hit:
        """The evidence as the server shows a retrieved chunk."""
        return Hit(doc_id=self.id, version=1, chunk_id=0, ordinal=0, text=self.evidence, score=score,
                   source=self.source or self.id, valid_from=self.valid_from, metadata={})  # fmt: skip


@dataclass
class ReaderReport:
    """What a reader build did: the data it read, the training, the checks before and after."""

    dataset: str
    dataset_sha256: str
    until: str
    rows: int
    train_examples: int
    validation_examples: int
    pair_share: float
    base_model: str
    refuse_share: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    recipe_version: int = RECIPE_VERSION


def load_rows(path: Path, *, until: float | None = None) -> list[ReadingRow]:
    """The rows of a reading set dated up to `until` (all when None), oldest first."""
    rows = []
    try:
        lines = read_text(path, str(path)).splitlines()
        parsed = [
            (f"{path}:{n}", json_object(line, f"{path}:{n}")) for n, line in enumerate(lines, start=1) if line.strip()
        ]
    except SourceError as exc:
        raise ReadingSetError(str(exc)) from None
    for where, raw in parsed:
        for row in document_rows(raw, where) if "question" not in raw and "text" in raw else [_row(raw, where)]:
            if until is None or row.valid_from <= until:
                rows.append(row)
    return sorted(rows, key=lambda r: (r.valid_from, r.id))


@dataclass(frozen=True)
class _Document:
    doc_id: str
    text: str
    valid_from: float
    source: str = ""
    version: int = 1


def document_rows(raw: dict[str, Any], where: str, per_doc: int = DOC_QUESTIONS) -> list[ReadingRow]:
    """Up to `per_doc` rows from one document: questions built around its answer spans, the span the answer."""
    from kfresh.finetuner.transfer import candidates

    for name in ("id", "text"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise ReadingSetError(f"{where}: field '{name}' must be a non-empty string (a document row)")
    try:
        valid_from = parse_time(raw.get("valid_from") or raw.get("date"), where)
    except (SourceError, ValueError) as exc:
        raise ReadingSetError(f"{where}: field 'valid_from': {exc}") from exc
    if valid_from is None:
        raise ReadingSetError(f"{where}: field 'valid_from' is required (the reader learns dates as served)")
    doc = _Document(raw["id"].strip(), raw["text"].strip(), valid_from, str(raw.get("source", "")))
    found, _ = candidates(doc, per_doc=per_doc)
    return [ReadingRow(id=f"{doc.doc_id}#{n}", question=c.question, answer=c.span, evidence=doc.text,
                       valid_from=valid_from, source=doc.source) for n, c in enumerate(found, start=1)]  # fmt: skip


def _row(raw: dict[str, Any], where: str) -> ReadingRow:
    for name in ("question", "evidence", "date"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise ReadingSetError(f"{where}: field '{name}' must be a non-empty string")
    answer = raw.get("answer")
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ReadingSetError(f"{where}: field 'answer' must index field 'choices'")
        answer = choices[answer]
    if not isinstance(answer, str) or not answer.strip():
        raise ReadingSetError(f"{where}: field 'answer' must be a non-empty string (or an index into 'choices')")
    try:
        valid_from = parse_time(raw["date"], where)
    except ValueError as exc:
        raise ReadingSetError(f"{where}: field 'date': {exc}") from exc
    assert valid_from is not None  # the date is a non-empty string
    return ReadingRow(id=str(raw.get("id", where)), question=raw["question"].strip(), answer=answer.strip(),
                      evidence=raw["evidence"].strip(), valid_from=valid_from, source=str(raw.get("source", "")))  # fmt: skip


def nearest_other(rows: Sequence[ReadingRow], encode: Callable[[list[str]], np.ndarray]) -> list[int]:
    """For each row, the row whose evidence is closest to its question, other than its own: the distractor a
    retriever would most likely show beside (or instead of) the evidence."""
    return [others[0] for others in nearest_others(rows, encode, 1)]


def nearest_others(rows: Sequence[ReadingRow], encode: Callable[[list[str]], np.ndarray], n: int) -> list[list[int]]:
    """For each row, the `n` rows with other evidence closest to its question, the closest first; one row per
    evidence text (rows built from one document share it)."""
    evidence = encode([r.evidence for r in rows])
    questions = encode([r.question for r in rows])
    sims = questions @ evidence.T
    texts = np.array([r.evidence for r in rows], dtype=object)
    sims[texts[:, None] == texts[None, :]] = -np.inf  # its own evidence (other rows from the same document too)
    out = []
    for i in range(len(rows)):
        picked: list[int] = []
        for j in np.argsort(-sims[i], kind="stable"):
            if len(picked) == n or sims[i, j] == -np.inf:
                break
            if all(rows[j].evidence != rows[k].evidence for k in picked):
                picked.append(int(j))
        out.append(picked)
    return out


def examples(
    rows: Sequence[ReadingRow],
    distractor: Sequence[int],
    *,
    pair_share: float,
    seed: int,
    refuse_share: float = 0.0,
    others: Sequence[Sequence[int]] = (),
) -> list[tuple[Messages, str]]:
    """(the served prompt, the target answer) per row: the evidence alone, or with its distractor (in date order);
    or, a share `refuse_share`, its distractors alone (`others[i]`, default the distractor) answered with
    NOT_FOUND_REPLY. A row whose answer one of those distractors states is never a refusal row (it is shown
    with its evidence and distractor instead): the reply would be false."""
    rng = random.Random(seed)
    out = []
    for i, (row, other) in enumerate(zip(rows, distractor, strict=True)):
        shown = [row.hit()]
        draw = rng.random()
        if draw < refuse_share:
            hidden = [rows[j] for j in (others[i] if others else [other])]
            if not any(row.answer.lower() in h.evidence.lower() for h in hidden):
                shown = sorted([h.hit(0.5) for h in hidden], key=lambda h: (h.valid_from, h.doc_id))
                out.append((build_messages(row.question, shown), NOT_FOUND_REPLY))
                continue
        if draw < refuse_share + pair_share:
            shown = sorted([row.hit(), rows[other].hit(0.5)], key=lambda h: (h.valid_from, h.doc_id))
        out.append((build_messages(row.question, shown), target(row.answer)))
    return out


def target(answer: str) -> str:
    """The short answer as the reader should say it: the answer itself, ending like a sentence."""
    return answer if answer.endswith((".", "!", "?")) else f"{answer}."


def encode_example(tokenizer: Any, messages: Messages, answer: str) -> Encoded:
    """Prompt (as served) + answer + end of turn; the loss on the answer only, whose tokens validation checks."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + tokenizer.eos_token + "\n", add_special_tokens=False)["input_ids"]
    body = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return Encoded(prompt + answer_ids, [-100] * len(prompt) + answer_ids, [len(prompt) + i for i in range(body)])


def recipe(cfg: KfreshConfig, budget_s: float | None = None) -> FinetuneConfig:
    """The finetune settings a reader trains with: `cfg.finetune` (LoRA shape, KL weight, seed) with `RECIPE`."""
    update = dict(RECIPE) if budget_s is None else {**RECIPE, "time_budget_s": budget_s}
    return cfg.finetune.model_copy(update=update)


def reader_key(
    base_sha256: str, dataset_sha256: str, until: str, f: FinetuneConfig, refuse_share: float = REFUSE_SHARE
) -> str:
    """What a built reader depends on: the base weights, the data, the cut-off and the recipe."""
    shape = {"v": RECIPE_VERSION, "lr": f.learning_rate, "rank": f.lora_rank, "alpha": f.lora_alpha,
              "targets": list(f.target_modules), "kl": f.kl_weight, "seed": f.seed, "budget": f.time_budget_s,
              "epochs": f.max_epochs, "batch": f.batch_size}  # fmt: skip
    if refuse_share:  # keys of readers built without refusal rows stay what they were
        shape["refuse"] = refuse_share
    blob = json.dumps([base_sha256, dataset_sha256, until, shape], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MIN_ROWS = 10


def check_size(rows: Sequence[ReadingRow]) -> None:
    if len(rows) < MIN_ROWS:
        raise ReadingSetError(f"a reading set needs at least {MIN_ROWS} rows up to the cut-off; it has {len(rows)}")
    if len({r.evidence for r in rows}) < 1 + REFUSE_WITH:  # every row needs other passages to be shown beside it
        raise ReadingSetError(
            f"a reading set needs at least {1 + REFUSE_WITH} different evidence passages up to the cut-off; "
            f"it has {len({r.evidence for r in rows})}"
        )


def validation_size(rows: int) -> int:
    return max(1, min(40, rows // 10))


def train_reader(
    cfg: KfreshConfig,
    lm: LoadedModel,
    rows: Sequence[ReadingRow],
    encode: Callable[[list[str]], np.ndarray],
    work_dir: Path,
    *,
    settings: FinetuneConfig | None = None,
    pair_share: float = PAIR_SHARE,
    refuse_share: float = REFUSE_SHARE,
    validation: int | None = None,
) -> dict[str, Any]:
    """Train the reader LoRA on `rows` (the newest `validation` rows early-stop it) with `settings` (default
    `recipe(cfg)`; default validation: a tenth, at most 40); `lm.model` ends wrapped by peft with the adapter attached, ready for `merge`. Returns the
    training figures."""
    from kfresh.finetuner import replay
    from kfresh.finetuner.modeling import model_sha256
    from kfresh.finetuner.train import train_encoded

    check_size(rows)
    validation = validation or validation_size(len(rows))
    pool = (
        replay.build_pool(lm, cfg.finetune.work_dir / "replay", model_sha256(lm.path))
        if cfg.finetune.kl_weight > 0
        else []
    )
    others = nearest_others(rows, encode, REFUSE_WITH)
    pairs = examples(rows, [o[0] for o in others], pair_share=pair_share, seed=cfg.finetune.seed,
                     refuse_share=refuse_share, others=others)  # fmt: skip
    encoded = [encode_example(lm.tokenizer, m, a) for m, a in pairs]
    train, val = encoded[:-validation], encoded[-validation:]
    log.info("reader.examples train=%d validation=%d pair_share=%.2f refusals=%d", len(train), len(val), pair_share,
             sum(a == NOT_FOUND_REPLY for _, a in pairs))  # fmt: skip
    result = train_encoded(lm, train, val, pool, settings or recipe(cfg), work_dir / "adapter", desc="reader: training")
    return {**result.to_dict(), "train_examples": len(train), "validation_examples": len(val)}


def merge(lm: LoadedModel, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Merge the attached LoRA into the weights and save a model folder vLLM and the finetuner load like the
    base (bf16 safetensors, the tokenizer and its chat template), with `manifest` beside it."""
    import torch

    merged = lm.model.merge_and_unload()
    merged.to(torch.bfloat16)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    lm.tokenizer.save_pretrained(str(out_dir))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    for path in out_dir.iterdir():
        path.chmod(0o644)
    return out_dir


def build_reader(
    cfg: KfreshConfig,
    dataset: Path,
    until: str,
    dest: Path,
    base_path: str,
    *,
    budget_s: float | None = None,
    refuse_share: float = REFUSE_SHARE,
) -> ReaderReport:
    """Everything `kfresh provision --reader-data` does, into `dest` (a finished folder appears atomically);
    a reader already there for the same base, data, cut-off and recipe is kept (its report is returned)."""
    from kfresh.finetuner.modeling import load_base, model_sha256, resolve_device
    from kfresh.indexer.embedding.embedder import create_embedder

    started = time.perf_counter()
    settings = recipe(cfg, budget_s)
    cut = parse_time(until, "--reader-until") if until else None
    rows = load_rows(dataset, until=cut)
    check_size(rows)
    data_sha, base_sha = sha256_file(dataset), model_sha256(base_path)
    key = reader_key(base_sha, data_sha, until, settings, refuse_share)
    report = ReaderReport(dataset=str(dataset), dataset_sha256=data_sha, until=until, rows=len(rows),
                          train_examples=0, validation_examples=0, pair_share=PAIR_SHARE, base_model=base_path,
                          refuse_share=refuse_share)  # fmt: skip

    def build(tmp: Path) -> None:
        import shutil

        lm = load_base(base_path, device=resolve_device(cfg.finetune.device))
        before = retention(lm)
        figures = train_reader(cfg, lm, rows, create_embedder(cfg).encode, tmp / ".work", settings=settings,
                               refuse_share=refuse_share)  # fmt: skip
        report.train = {k: v for k, v in figures.items() if k not in ("train_examples", "validation_examples")}
        report.train_examples, report.validation_examples = figures["train_examples"], figures["validation_examples"]
        report.checks = {"before": before, "after": retention(lm)}
        report.seconds = round(time.perf_counter() - started, 1)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        merge(lm, tmp, {**asdict(report), "base_sha256": base_sha, "key": key})

    build_dir_once(dest, is_current=lambda: saved_key(dest) == key, build=build)
    saved = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    return ReaderReport(**{k: v for k, v in saved.items() if k in ReaderReport.__dataclass_fields__})


def saved_key(dest: Path) -> str | None:
    """The key of the reader finished in `dest`, if any."""
    try:
        return str(json.loads((dest / MANIFEST).read_text(encoding="utf-8"))["key"])
    except (OSError, ValueError, KeyError):
        return None


def retention(lm: LoadedModel) -> dict[str, Any]:
    """The gate's retention figures for the model as it is: general questions right, general-text perplexity."""
    from kfresh.finetuner import datasets
    from kfresh.finetuner.evaluate import contains_answer, perplexity
    from kfresh.finetuner.modeling import chat_answers
    from kfresh.prompt import closed_book_messages

    general = datasets.general_questions()
    answers = chat_answers(lm, [closed_book_messages(g.question) for g in general], max_new_tokens=32, desc="reader: general questions")  # fmt: skip
    right = sum(contains_answer(a, g.answers) for a, g in zip(answers, general))
    return {"general_right": right, "general_total": len(general), "perplexity": round(perplexity(lm), 3)}
