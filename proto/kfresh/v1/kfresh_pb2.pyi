import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_STORED: _ClassVar[AckStatus]
    ACK_STATUS_UNCHANGED: _ClassVar[AckStatus]
    ACK_STATUS_DELETED: _ClassVar[AckStatus]
    ACK_STATUS_NOT_FOUND: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_STORED: AckStatus
ACK_STATUS_UNCHANGED: AckStatus
ACK_STATUS_DELETED: AckStatus
ACK_STATUS_NOT_FOUND: AckStatus

class Document(_message.Message):
    __slots__ = ("id", "text", "source", "metadata", "valid_from", "supersedes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    source: str
    metadata: _containers.ScalarMap[str, str]
    valid_from: _timestamp_pb2.Timestamp
    supersedes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., supersedes: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("upsert", "delete_id")
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    DELETE_ID_FIELD_NUMBER: _ClassVar[int]
    upsert: Document
    delete_id: str
    def __init__(self, upsert: _Optional[_Union[Document, _Mapping]] = ..., delete_id: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("id", "version", "status", "chunks", "seq", "acked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    status: AckStatus
    chunks: int
    seq: int
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., chunks: _Optional[int] = ..., seq: _Optional[int] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("id", "version", "seq")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    seq: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("equals", "any_of", "source", "valid_from_min", "valid_from_max")
    class EqualsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnyOfEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StringList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_MIN_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_MAX_FIELD_NUMBER: _ClassVar[int]
    equals: _containers.ScalarMap[str, str]
    any_of: _containers.MessageMap[str, StringList]
    source: _containers.RepeatedScalarFieldContainer[str]
    valid_from_min: _timestamp_pb2.Timestamp
    valid_from_max: _timestamp_pb2.Timestamp
    def __init__(self, equals: _Optional[_Mapping[str, str]] = ..., any_of: _Optional[_Mapping[str, StringList]] = ..., source: _Optional[_Iterable[str]] = ..., valid_from_min: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_from_max: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "k", "filter", "where", "min_seq", "as_of", "valid_at")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    VALID_AT_FIELD_NUMBER: _ClassVar[int]
    query: str
    k: int
    filter: _containers.ScalarMap[str, str]
    where: Filter
    min_seq: int
    as_of: _timestamp_pb2.Timestamp
    valid_at: _timestamp_pb2.Timestamp
    def __init__(self, query: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., where: _Optional[_Union[Filter, _Mapping]] = ..., min_seq: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("doc_id", "version", "chunk_id", "ordinal", "text", "score", "source", "valid_from", "metadata", "acked_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    ORDINAL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    version: int
    chunk_id: int
    ordinal: int
    text: str
    score: float
    source: str
    valid_from: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, doc_id: _Optional[str] = ..., version: _Optional[int] = ..., chunk_id: _Optional[int] = ..., ordinal: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("chunks", "retrieval_ms", "all_matches")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ALL_MATCHES_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    retrieval_ms: float
    all_matches: bool
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., retrieval_ms: _Optional[float] = ..., all_matches: _Optional[bool] = ...) -> None: ...

class AnswerRequest(_message.Message):
    __slots__ = ("question", "k", "filter", "closed_book", "max_tokens", "temperature", "adapter", "where", "min_seq", "as_of", "valid_at")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BOOK_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    VALID_AT_FIELD_NUMBER: _ClassVar[int]
    question: str
    k: int
    filter: _containers.ScalarMap[str, str]
    closed_book: bool
    max_tokens: int
    temperature: float
    adapter: str
    where: Filter
    min_seq: int
    as_of: _timestamp_pb2.Timestamp
    valid_at: _timestamp_pb2.Timestamp
    def __init__(self, question: _Optional[str] = ..., k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., closed_book: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., adapter: _Optional[str] = ..., where: _Optional[_Union[Filter, _Mapping]] = ..., min_seq: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("index", "doc_id", "version", "source", "valid_from", "score", "text", "primary", "acked_at")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    doc_id: str
    version: int
    source: str
    valid_from: _timestamp_pb2.Timestamp
    score: float
    text: str
    primary: bool
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, index: _Optional[int] = ..., doc_id: _Optional[str] = ..., version: _Optional[int] = ..., source: _Optional[str] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., primary: _Optional[bool] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("retrieval_ms", "time_to_first_token_ms", "total_ms")
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    retrieval_ms: float
    time_to_first_token_ms: float
    total_ms: float
    def __init__(self, retrieval_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AnswerDone(_message.Message):
    __slots__ = ("citations", "timings", "finish_reason", "output_tokens", "model", "adapter", "superseded", "answer_id")
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    ANSWER_ID_FIELD_NUMBER: _ClassVar[int]
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    timings: Timings
    finish_reason: str
    output_tokens: int
    model: str
    adapter: str
    superseded: _containers.RepeatedCompositeFieldContainer[Citation]
    answer_id: str
    def __init__(self, citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., finish_reason: _Optional[str] = ..., output_tokens: _Optional[int] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., superseded: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., answer_id: _Optional[str] = ...) -> None: ...

class PurgeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PurgeResponse(_message.Message):
    __slots__ = ("id", "version", "seq", "versions", "chunks", "citations", "answers", "review_items", "snapshot_written")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    seq: int
    versions: int
    chunks: int
    citations: int
    answers: int
    review_items: int
    snapshot_written: bool
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., seq: _Optional[int] = ..., versions: _Optional[int] = ..., chunks: _Optional[int] = ..., citations: _Optional[int] = ..., answers: _Optional[int] = ..., review_items: _Optional[int] = ..., snapshot_written: _Optional[bool] = ...) -> None: ...

class GetAnswerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReplayAnswerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class LoggedAnswer(_message.Message):
    __slots__ = ("id", "at", "question", "answer", "model", "adapter", "finish_reason", "output_tokens", "closed_book", "prompt_format", "citations", "superseded", "k", "max_tokens", "temperature", "filter_json", "timings", "tenant", "replay_of")
    class TenantEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BOOK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FILTER_JSON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    id: str
    at: _timestamp_pb2.Timestamp
    question: str
    answer: str
    model: str
    adapter: str
    finish_reason: str
    output_tokens: int
    closed_book: bool
    prompt_format: str
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    superseded: _containers.RepeatedCompositeFieldContainer[Citation]
    k: int
    max_tokens: int
    temperature: float
    filter_json: str
    timings: Timings
    tenant: _containers.ScalarMap[str, str]
    replay_of: str
    def __init__(self, id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., finish_reason: _Optional[str] = ..., output_tokens: _Optional[int] = ..., closed_book: _Optional[bool] = ..., prompt_format: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., superseded: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., filter_json: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., tenant: _Optional[_Mapping[str, str]] = ..., replay_of: _Optional[str] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("delta", "done")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    delta: str
    done: AnswerDone
    def __init__(self, delta: _Optional[str] = ..., done: _Optional[_Union[AnswerDone, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WaitSearchableRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class WaitSearchableResponse(_message.Message):
    __slots__ = ("searchable", "target_seq", "applied_seq", "waited_ms")
    SEARCHABLE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SEQ_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    searchable: bool
    target_seq: int
    applied_seq: int
    waited_ms: float
    def __init__(self, searchable: _Optional[bool] = ..., target_seq: _Optional[int] = ..., applied_seq: _Optional[int] = ..., waited_ms: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after_seq", "from_now")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FROM_NOW_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    from_now: bool
    def __init__(self, after_seq: _Optional[int] = ..., from_now: _Optional[bool] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("seq", "id", "version", "op", "acked_at", "searchable_at", "lag_ms", "source", "metadata", "valid_from")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    SEARCHABLE_AT_FIELD_NUMBER: _ClassVar[int]
    LAG_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    id: str
    version: int
    op: str
    acked_at: _timestamp_pb2.Timestamp
    searchable_at: _timestamp_pb2.Timestamp
    lag_ms: float
    source: str
    metadata: _containers.ScalarMap[str, str]
    valid_from: _timestamp_pb2.Timestamp
    def __init__(self, seq: _Optional[int] = ..., id: _Optional[str] = ..., version: _Optional[int] = ..., op: _Optional[str] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., searchable_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lag_ms: _Optional[float] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LagPercentiles(_message.Message):
    __slots__ = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "count")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    count: int
    def __init__(self, p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., max_ms: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("documents", "chunks", "pending", "ingest_docs_per_s", "freshness", "embedder", "index_kind", "model", "adapter", "generation_backend", "model_ready", "uptime_s", "deleted", "indexed_vectors", "distill", "tenant", "history", "index_detail", "index_maintenance_pending")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    INGEST_DOCS_PER_S_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_READY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    INDEXED_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    INDEX_DETAIL_FIELD_NUMBER: _ClassVar[int]
    INDEX_MAINTENANCE_PENDING_FIELD_NUMBER: _ClassVar[int]
    documents: int
    chunks: int
    pending: int
    ingest_docs_per_s: float
    freshness: LagPercentiles
    embedder: str
    index_kind: str
    model: str
    adapter: str
    generation_backend: str
    model_ready: bool
    uptime_s: float
    deleted: int
    indexed_vectors: int
    distill: DistillSummary
    tenant: TenantStats
    history: HistoryStats
    index_detail: str
    index_maintenance_pending: bool
    def __init__(self, documents: _Optional[int] = ..., chunks: _Optional[int] = ..., pending: _Optional[int] = ..., ingest_docs_per_s: _Optional[float] = ..., freshness: _Optional[_Union[LagPercentiles, _Mapping]] = ..., embedder: _Optional[str] = ..., index_kind: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., generation_backend: _Optional[str] = ..., model_ready: _Optional[bool] = ..., uptime_s: _Optional[float] = ..., deleted: _Optional[int] = ..., indexed_vectors: _Optional[int] = ..., distill: _Optional[_Union[DistillSummary, _Mapping]] = ..., tenant: _Optional[_Union[TenantStats, _Mapping]] = ..., history: _Optional[_Union[HistoryStats, _Mapping]] = ..., index_detail: _Optional[str] = ..., index_maintenance_pending: _Optional[bool] = ...) -> None: ...

class HistoryStats(_message.Message):
    __slots__ = ("versions", "replaced_chunks", "memory_bytes", "slice_search")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLICE_SEARCH_FIELD_NUMBER: _ClassVar[int]
    versions: int
    replaced_chunks: int
    memory_bytes: int
    slice_search: LagPercentiles
    def __init__(self, versions: _Optional[int] = ..., replaced_chunks: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., slice_search: _Optional[_Union[LagPercentiles, _Mapping]] = ...) -> None: ...

class TenantStats(_message.Message):
    __slots__ = ("binding", "documents", "chunks")
    class BindingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BINDING_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    binding: _containers.ScalarMap[str, str]
    documents: int
    chunks: int
    def __init__(self, binding: _Optional[_Mapping[str, str]] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("version", "parent", "served_name", "base_model", "base_model_sha256", "training_data_sha256", "weights_sha256", "created_at", "facts", "metrics", "notes", "current", "loaded", "standby", "withdrawn")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SERVED_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent: str
    served_name: str
    base_model: str
    base_model_sha256: str
    training_data_sha256: str
    weights_sha256: str
    created_at: _timestamp_pb2.Timestamp
    facts: int
    metrics: _struct_pb2.Struct
    notes: str
    current: bool
    loaded: bool
    standby: bool
    withdrawn: str
    def __init__(self, version: _Optional[str] = ..., parent: _Optional[str] = ..., served_name: _Optional[str] = ..., base_model: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., training_data_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., facts: _Optional[int] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., notes: _Optional[str] = ..., current: _Optional[bool] = ..., loaded: _Optional[bool] = ..., standby: _Optional[bool] = ..., withdrawn: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "current", "enabled")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    current: str
    enabled: bool
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., current: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class PromoteAdapterRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackAdapterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterChangeResponse(_message.Message):
    __slots__ = ("current", "previous", "swap_ms")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    SWAP_MS_FIELD_NUMBER: _ClassVar[int]
    current: str
    previous: str
    swap_ms: float
    def __init__(self, current: _Optional[str] = ..., previous: _Optional[str] = ..., swap_ms: _Optional[float] = ...) -> None: ...

class DistillRequest(_message.Message):
    __slots__ = ("dry_run", "wait")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    wait: bool
    def __init__(self, dry_run: _Optional[bool] = ..., wait: _Optional[bool] = ...) -> None: ...

class DistillResponse(_message.Message):
    __slots__ = ("state", "version", "facts", "new_facts", "kept_facts", "figures", "report_path", "message", "trigger")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[DistillResponse.State]
        STARTED: _ClassVar[DistillResponse.State]
        RUNNING: _ClassVar[DistillResponse.State]
        PUBLISHED: _ClassVar[DistillResponse.State]
        REJECTED: _ClassVar[DistillResponse.State]
        NOTHING_NEW: _ClassVar[DistillResponse.State]
        DRY_RUN: _ClassVar[DistillResponse.State]
        FAILED: _ClassVar[DistillResponse.State]
    STATE_UNSPECIFIED: DistillResponse.State
    STARTED: DistillResponse.State
    RUNNING: DistillResponse.State
    PUBLISHED: DistillResponse.State
    REJECTED: DistillResponse.State
    NOTHING_NEW: DistillResponse.State
    DRY_RUN: DistillResponse.State
    FAILED: DistillResponse.State
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    NEW_FACTS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FACTS_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    state: DistillResponse.State
    version: str
    facts: _containers.RepeatedScalarFieldContainer[str]
    new_facts: int
    kept_facts: int
    figures: _containers.ScalarMap[str, float]
    report_path: str
    message: str
    trigger: str
    def __init__(self, state: _Optional[_Union[DistillResponse.State, str]] = ..., version: _Optional[str] = ..., facts: _Optional[_Iterable[str]] = ..., new_facts: _Optional[int] = ..., kept_facts: _Optional[int] = ..., figures: _Optional[_Mapping[str, float]] = ..., report_path: _Optional[str] = ..., message: _Optional[str] = ..., trigger: _Optional[str] = ...) -> None: ...

class DistillSummary(_message.Message):
    __slots__ = ("running", "last", "runs")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    running: bool
    last: DistillResponse
    runs: int
    def __init__(self, running: _Optional[bool] = ..., last: _Optional[_Union[DistillResponse, _Mapping]] = ..., runs: _Optional[int] = ...) -> None: ...

class ReviewItem(_message.Message):
    __slots__ = ("id", "doc_id", "version", "question", "answer", "span", "kind", "sentence", "state", "base_wrong", "cited", "added_at", "decided_by", "decided_at", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_WRONG_FIELD_NUMBER: _ClassVar[int]
    CITED_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: int
    doc_id: str
    version: int
    question: str
    answer: str
    span: str
    kind: str
    sentence: str
    state: str
    base_wrong: bool
    cited: int
    added_at: _timestamp_pb2.Timestamp
    decided_by: str
    decided_at: _timestamp_pb2.Timestamp
    note: str
    def __init__(self, id: _Optional[int] = ..., doc_id: _Optional[str] = ..., version: _Optional[int] = ..., question: _Optional[str] = ..., answer: _Optional[str] = ..., span: _Optional[str] = ..., kind: _Optional[str] = ..., sentence: _Optional[str] = ..., state: _Optional[str] = ..., base_wrong: _Optional[bool] = ..., cited: _Optional[int] = ..., added_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class ListReviewRequest(_message.Message):
    __slots__ = ("state", "limit", "id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    state: str
    limit: int
    id: int
    def __init__(self, state: _Optional[str] = ..., limit: _Optional[int] = ..., id: _Optional[int] = ...) -> None: ...

class ListReviewResponse(_message.Message):
    __slots__ = ("items", "counts", "required")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    counts: _containers.ScalarMap[str, int]
    required: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ..., counts: _Optional[_Mapping[str, int]] = ..., required: _Optional[bool] = ...) -> None: ...

class DecideReviewRequest(_message.Message):
    __slots__ = ("ids", "decision", "reviewer", "note")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[DecideReviewRequest.Decision]
        APPROVE: _ClassVar[DecideReviewRequest.Decision]
        REJECT: _ClassVar[DecideReviewRequest.Decision]
    DECISION_UNSPECIFIED: DecideReviewRequest.Decision
    APPROVE: DecideReviewRequest.Decision
    REJECT: DecideReviewRequest.Decision
    IDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    decision: DecideReviewRequest.Decision
    reviewer: str
    note: str
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., decision: _Optional[_Union[DecideReviewRequest.Decision, str]] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class DecideReviewResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ...) -> None: ...
