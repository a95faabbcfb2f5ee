"""Edge validation: protobuf messages in, domain values out, or InvalidInput saying what is wrong."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from kfresh.core.config import AnswerConfig, RetrievalConfig
from kfresh.core.errors import InvalidInput
from kfresh.core.time import from_timestamp
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.filters import Filter, check_filter
from kfresh.v1 import kfresh_pb2 as pb

MAX_ID_CHARS = 256
MAX_FILTER_PAIRS = 32
# Within google.protobuf.Timestamp's range (0001-01-01 .. 9999-12-31 UTC), a day inside for float rounding:
# outside it a stored document could never become a Chunk or Citation again, and every search that found
# it would fail.
MIN_TIMESTAMP_S, MAX_TIMESTAMP_S = -62_135_596_800 + 86_400, 253_402_300_799 - 86_400


def reject_unknown_fields(message: Message, path: str = "request") -> None:
    """Fields this server does not know are an error, not silently ignored (a client/schema mismatch)."""
    if len(UnknownFieldSet(message)):
        numbers = sorted({f.field_number for f in UnknownFieldSet(message)})
        raise InvalidInput(f"{path} has unknown field number(s) {numbers}: client and server schemas differ")
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                reject_unknown_fields(item, f"{path}.{field.name}[{i}]")
        else:
            reject_unknown_fields(value, f"{path}.{field.name}")


def _check_filter(filters: dict[str, str], field: str) -> dict[str, str]:
    if len(filters) > MAX_FILTER_PAIRS:
        raise InvalidInput(f"{field} has {len(filters)} pairs; at most {MAX_FILTER_PAIRS} are allowed")
    for key in filters:
        if not key:
            raise InvalidInput(f"{field} has an empty key")
    return dict(filters)


def query_filter(req: pb.RetrieveRequest | pb.AnswerRequest) -> Filter:
    """The request's `filter` map and `where` message as one Filter (INVALID_ARGUMENT naming the bad part)."""
    base = Filter(equals=_check_filter(dict(req.filter), "filter"))
    if not req.HasField("where"):
        return base
    where = req.where
    any_of = {key: frozenset(values.values) for key, values in where.any_of.items()}
    if any(not key for key in any_of):
        raise InvalidInput("where.any_of has an empty key")
    extra = Filter(
        equals={}, any_of=any_of, sources=tuple(where.source),
        valid_from_min=from_timestamp(where.valid_from_min) if where.HasField("valid_from_min") else None,
        valid_from_max=from_timestamp(where.valid_from_max) if where.HasField("valid_from_max") else None,
    )  # fmt: skip
    return check_filter(extra).with_equals(base.equals).with_equals(_check_filter(dict(where.equals), "where.equals"))


def document_from_proto(doc: pb.Document) -> DocumentIn:
    """Shape checks only; size limits that depend on config are enforced by the indexer."""
    if not doc.id.strip():
        raise InvalidInput("document.id is empty")
    if len(doc.id) > MAX_ID_CHARS:
        raise InvalidInput(f"document.id is {len(doc.id)} characters; at most {MAX_ID_CHARS} are allowed")
    if not doc.text.strip():
        raise InvalidInput(f"document {doc.id!r} has empty text")
    valid_from = None
    if doc.HasField("valid_from"):
        seconds, nanos = doc.valid_from.seconds, doc.valid_from.nanos
        if not MIN_TIMESTAMP_S <= seconds <= MAX_TIMESTAMP_S or not 0 <= nanos < 1_000_000_000:
            raise InvalidInput(
                f"document {doc.id!r} valid_from must lie between 0001-01-02 and 9999-12-30 (nanos 0..999999999)"
            )
        valid_from = from_timestamp(doc.valid_from)
    return DocumentIn(
        id=doc.id,
        text=doc.text,
        source=doc.source,
        metadata=dict(doc.metadata),
        valid_from=valid_from,
        supersedes=tuple(doc.supersedes),
    )


def check_doc_id(doc_id: str, field: str = "id") -> str:
    if not doc_id.strip():
        raise InvalidInput(f"{field} is empty")
    if len(doc_id) > MAX_ID_CHARS:
        raise InvalidInput(f"{field} is {len(doc_id)} characters; at most {MAX_ID_CHARS} are allowed")
    return doc_id


def _check_count(value: int, default: int, limit: int, field: str) -> int:
    if value == 0:
        return default
    if not 1 <= value <= limit:
        raise InvalidInput(f"{field} must be between 1 and {limit} (or 0 for the default {default}); got {value}")
    return value


def _check_text(text: str, limit: int, field: str) -> str:
    if not text.strip():
        raise InvalidInput(f"{field} is empty")
    if len(text) > limit:
        raise InvalidInput(f"{field} is {len(text)} characters; at most {limit} are allowed")
    return text


@dataclass(frozen=True)
class RetrieveQuery:
    query: str
    k: int  # as sent (0 = the default): the indexer validates and defaults it (indexer.validation.check_k)
    filters: Filter
    as_of: float | None = None
    valid_at: float | None = None


def retrieve_query(req: pb.RetrieveRequest, cfg: RetrievalConfig) -> RetrieveQuery:
    reject_unknown_fields(req)
    return RetrieveQuery(
        query=_check_text(req.query, cfg.max_query_chars, "query"),
        k=req.k,
        filters=query_filter(req),
        as_of=_time(req, "as_of"),
        valid_at=_time(req, "valid_at"),
    )


def _time(req: pb.RetrieveRequest | pb.AnswerRequest, name: str) -> float | None:
    """An optional Timestamp field as unix seconds."""
    return from_timestamp(getattr(req, name)) if req.HasField(name) else None


@dataclass(frozen=True)
class AnswerQuery:
    question: str
    k: int  # as sent (0 = answer.default_k): the indexer validates and defaults it when the answer retrieves
    filters: Filter
    closed_book: bool
    max_tokens: int
    temperature: float
    adapter: str
    # the caller's token binding (already in `filters`)
    tenant: Mapping[str, str] = dataclasses.field(default_factory=dict)
    as_of: float | None = None
    valid_at: float | None = None


def answer_query(req: pb.AnswerRequest, cfg: AnswerConfig, retrieval: RetrievalConfig) -> AnswerQuery:
    reject_unknown_fields(req)
    temperature = req.temperature if req.HasField("temperature") else cfg.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidInput(f"temperature must be between 0 and 2; got {temperature}")
    return AnswerQuery(
        question=_check_text(req.question, retrieval.max_query_chars, "question"),
        k=req.k,
        filters=query_filter(req),
        closed_book=req.closed_book,
        max_tokens=_check_count(req.max_tokens, cfg.max_tokens, cfg.max_tokens_limit, "max_tokens"),
        temperature=temperature,
        adapter=req.adapter,
        as_of=_time(req, "as_of"),
        valid_at=_time(req, "valid_at"),
    )


def check_answer_id(answer_id: str) -> str:
    """An answer log id as AnswerDone.answer_id gives it ("answer-" + 32 hex digits)."""
    if not answer_id:
        raise InvalidInput("id is empty: pass the answer_id an AnswerDone returned")
    if len(answer_id) > MAX_ID_CHARS:
        raise InvalidInput(f"id has {len(answer_id)} characters; at most {MAX_ID_CHARS}")
    return answer_id


WAIT_DEFAULT_S, WAIT_MAX_S = 30.0, 3600.0


def wait_timeout(req: pb.WaitSearchableRequest) -> float:
    """Seconds a WaitSearchable may wait: 0 means the default; negative, NaN or too long is INVALID_ARGUMENT."""
    reject_unknown_fields(req)
    t = req.timeout_s
    if not math.isfinite(t) or t < 0 or t > WAIT_MAX_S:
        raise InvalidInput(f"timeout_s must be between 0 and {WAIT_MAX_S:g} seconds, got {t}")
    return t or WAIT_DEFAULT_S


def review_decision(decision: int) -> Literal["approved", "rejected"]:
    if decision == pb.DecideReviewRequest.APPROVE:
        return "approved"
    if decision == pb.DecideReviewRequest.REJECT:
        return "rejected"
    raise InvalidInput("decision: set APPROVE or REJECT")
