"""Settings of answering and learning: the answer step, the generation engine, distillation into adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kfresh.core.config.section import DEFAULT_HOME, Section


class AnswerConfig(Section):
    default_k: int = Field(3, ge=1, description="Passages put into the prompt when a request leaves k at 0.")
    max_tokens: int = Field(96, ge=1, le=4096, description="Default answer length in tokens.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    temperature: float = Field(0.0, ge=0, le=2, description="Default sampling temperature (0 = greedy).")
    conflict_similarity: float = Field(
        0.65,
        ge=0,
        le=1,
        description="Passages from different documents this similar are treated as versions of one fact; the newest wins.",
    )
    named_conflict_similarity: float = Field(
        0.4, ge=0, le=1.01,
        description="The same from this similarity for passages that both hold a name the question asks about which at "
        "most one other retrieved passage holds, when the newer one holds at least half as many of the question's "
        "words (a correction worded afresh names the same company and answers the same question); 1.01 = off. "
        "Measured by `kfresh bench conflicts`, `newest_wins` and `reading`.",
    )  # fmt: skip
    min_score: float = Field(0.2, ge=-1, le=1, description="Passages scoring below this are not shown to the model.")
    score_margin: float = Field(
        0.25, ge=0, le=2, description="Passages scoring this far below the best one are not shown to the model."
    )
    max_concurrent: int = Field(32, ge=1, description="Concurrent generations; beyond it RESOURCE_EXHAUSTED.")
    prompt_format: Literal["system", "sandwich", "user"] = Field(
        "sandwich",
        description="Where the passages go: sandwich (the user turn: question, passages, the question again), system "
        "(passages in the system message) or user (passages, then the question); measured by `kfresh bench reading`.",
    )
    prompt_passages: int = Field(
        1, ge=0, le=64,
        description="How many of the retrieved passages (the best-scoring ones that survive conflict resolution) the model "
        "reads; 0 = all k. A small model reads one good passage better than several.",
    )  # fmt: skip
    rerank_weight: float = Field(
        0.3, ge=0, le=2,
        description="Which passages are read: cosine + this x the share of the question's rare words a passage holds "
        "(IDF over the retrieved pool); 0 = the embedder's order. Chosen on January-September news, measured by "
        "`kfresh bench reading`.",
    )  # fmt: skip
    rerank_pool: int = Field(
        16, ge=1, le=1024,
        description="Passages fetched for reranking before the best k are kept (at most retrieval.max_k).",
    )  # fmt: skip
    quote: bool = Field(
        True,
        description="After the model's answer, quote the sentence of the passages shown that best matches the question, "
        'verbatim, as [n] "..." (picked by the embedder; skipped when the answer already holds it).',
    )
    refuse_without_passages: bool = Field(
        True,
        description="When no passage clears min_score, reply that the documents do not say, instead of letting the model guess.",
    )


class AnswerLogConfig(Section):
    """The answer log: what each answer was asked and shown, for `kfresh explain` and `kfresh replay`."""

    enabled: bool = Field(
        True,
        description="Log every answer (question, passages shown with their versions, adapter, answer text, timings) "
        "in the document store. Request metadata (tokens) is never logged.",
    )
    retention_days: float = Field(
        30.0, gt=0, description="Logged answers older than this are deleted (checked at start and hourly)."
    )


class GenerationConfig(Section):
    """The model behind Answer."""

    backend: Literal["vllm", "remote"] = Field(
        "vllm", description="vllm: in-process engine; remote: a vLLM OpenAI-compatible server."
    )
    remote_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the remote vLLM server (remote backend); several, comma-separated = balanced replicas.",
    )
    remote_health_interval_s: float = Field(
        2.0,
        gt=0,
        description='How often each remote replica\'s /health is checked (and the model behind health service "" after start).',
    )
    remote_model: str = Field("", description="Model name on the remote server; empty = the first model it lists.")
    remote_timeout_s: float = Field(60.0, gt=0, description="HTTP timeout for the remote backend.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights dtype (float32 is batch-invariant)."
    )
    max_model_len: int = Field(2048, ge=128, description="Context length the engine reserves for.")
    kv_cache_gib: float = Field(2.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU boxes (GiB).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of GPU memory vLLM may take (CUDA only).")
    enforce_eager: bool = Field(True, description="Skip graph compilation: ~25 s start instead of ~100 s.")
    enable_lora: bool = Field(
        False,
        description="Serve LoRA adapters from finetune.registry_dir; slows generation even with none active (README: Adapters).",
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the engine accepts.")
    max_loras: int = Field(
        2, ge=1, le=64, description="Adapters kept loaded at once: the served one and the rollback target."
    )
    adapter_poll_s: float = Field(
        1.0, gt=0, le=3600, description="How often the server checks the registry for a newly promoted adapter."
    )


class FinetuneConfig(Section):
    """Distillation of validated knowledge into LoRA adapters (finetuner/)."""

    registry_dir: Path = Field(
        DEFAULT_HOME / "adapters", description="Versioned adapter registry (manifests + weights)."
    )
    work_dir: Path = Field(
        DEFAULT_HOME / "distill", description="Scratch folder for extraction records, training runs and gate reports."
    )
    trusted_sources: list[str] = Field(
        default_factory=lambda: ["*"], description="Glob patterns of document sources the finetuner may learn from."
    )
    stable_for_s: float = Field(
        3600.0, ge=0, description="A document must be unchanged this long before it is learned."
    )
    require_cited: bool = Field(False, description="Learn only documents that answers have retrieved and cited.")
    require_review: bool = Field(
        False,
        description="Learn only what a person approved: runs queue their candidates (kfresh review, the review RPCs).",
    )
    max_facts: int = Field(64, ge=1, description="Most facts distilled in one run.")
    seed: int = Field(0, description="Seed for sampling, splits and training.")
    lora_rank: int = Field(16, ge=1, le=256, description="LoRA rank (vLLM accepts 8, 16, 32, 64, ...).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters (all linear layers of a Llama block by default).",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate (linear decay after warm-up).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    batch_size: int = Field(4, ge=1, description="Fact examples per step (plus as many replay examples).")
    max_epochs: int = Field(12, ge=1, description="Upper bound on epochs; early stopping usually ends sooner.")
    kl_weight: float = Field(
        3.0, ge=0, description="Weight of the KL penalty toward the base model on replay examples."
    )
    replay_ratio: int = Field(1, ge=1, le=4, description="Replay sequences per fact example in each step.")
    context_examples: int = Field(
        1, ge=0, le=3,
        description="Retrieval-prompt examples per fact and epoch (first: a passage with a different value, which the "
        "answer follows; second: the fact's own passage; third: another different value).",
    )  # fmt: skip
    learned_accuracy: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Validation object accuracy at which the facts count as learned and the rate anneals.",
    )
    anneal_epochs: int = Field(
        2, ge=0, description="Epochs over which the rate decays to zero once the facts are learned."
    )
    time_budget_s: float = Field(600.0, gt=0, description="Hard wall-clock budget for training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where training runs.")
    questions_per_doc: int = Field(
        0, ge=0, le=32,
        description="Questions without templates per document, learned beside the template facts (answer spans "
        "picked in code, answered by the base model reading the document); 0 = template facts only. Off by default: "
        "on real news and on the sample corpus the pairs do not pass their gate yet (README: Distillation from any "
        "text); 4 is the measured setting.",
    )  # fmt: skip
    min_pair_recall: float = Field(
        0.3, ge=0, le=1,
        description="Gate: closed-book accuracy on the held-out cloze of the question pairs (new and kept ones).",
    )  # fmt: skip
    min_new_recall: float = Field(
        0.6, ge=0, le=1, description="Gate: closed-book accuracy on held-out questions about the new facts."
    )
    max_general_drop: float = Field(
        0.1, ge=0, le=1, description="Gate: largest allowed drop in general-question accuracy."
    )
    max_perplexity_increase: float = Field(
        0.1, ge=0, description="Gate: largest allowed relative rise in general-text perplexity."
    )
    min_previous_recall: float = Field(
        0.6, ge=0, le=1, description="Gate: accuracy kept on the previous adapter's facts."
    )
    interval_s: float = Field(0.0, ge=0, description="Scheduler: run every this many seconds (0 = off).")
    min_new_documents: int = Field(20, ge=1, description="Scheduler: run once this many new validated documents exist.")
    auto: bool = Field(
        False,
        description="Run distillation inside `kfresh serve` on the schedule (interval_s and/or min_new_documents).",
    )
    check_every_s: float = Field(
        60.0, gt=0, description="Scheduler: how often the server counts new validated documents."
    )
    worker_threads: int = Field(
        1,
        ge=0,
        description="Torch threads of the distillation worker (0 = torch's default); 1 beside a server on a small box.",
    )
    worker_nice: int = Field(
        10, ge=0, le=19, description="CPU niceness of the distillation worker, so answers keep their latency."
    )
    min_extraction_f1: float = Field(
        0.8, ge=0, le=1, description="Gate: extraction F1 against reviewed gold facts, where the documents have them."
    )
