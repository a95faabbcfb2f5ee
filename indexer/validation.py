"""Input checks at the indexer's edge; each failure names the offending field (-> INVALID_ARGUMENT)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kfresh.core.config import RetrievalConfig, StoreConfig
from kfresh.core.errors import InvalidInput
from kfresh.indexer.documents import DocumentIn

MAX_ID_CHARS = 256


def check_doc_id(doc_id: Any, field: str = "id") -> str:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InvalidInput(f"{field} must be a non-empty string")
    if len(doc_id) > MAX_ID_CHARS:
        raise InvalidInput(f"{field} is {len(doc_id)} characters; at most {MAX_ID_CHARS} are allowed")
    return doc_id


def check_document(doc: DocumentIn, cfg: StoreConfig) -> None:
    if not isinstance(doc, DocumentIn):
        raise InvalidInput("document must be a DocumentIn")
    check_doc_id(doc.id)
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise InvalidInput("text must be non-empty")
    if len(doc.text) > cfg.max_document_chars:
        raise InvalidInput(f"text is {len(doc.text)} characters; at most {cfg.max_document_chars} are allowed")
    if not isinstance(doc.source, str):
        raise InvalidInput("source must be a string")
    check_metadata(doc.metadata, "metadata")
    vf = doc.valid_from
    if vf is not None and (isinstance(vf, bool) or not isinstance(vf, (int, float)) or not math.isfinite(vf)):
        raise InvalidInput("valid_from must be a finite number of unix seconds or unset")
    if isinstance(doc.supersedes, str) or not isinstance(doc.supersedes, (tuple, list)):
        raise InvalidInput("supersedes must be a list of document ids")
    for other in doc.supersedes:
        check_doc_id(other, "supersedes[]")


def check_metadata(metadata: Any, field: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{field} must be a map of strings to strings")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(f"{field} keys and values must be strings (got {key!r}: {type(value).__name__})")
    return dict(metadata)


def check_query(query: Any, cfg: RetrievalConfig) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query must be non-empty")
    if len(query) > cfg.max_query_chars:
        raise InvalidInput(f"query is {len(query)} characters; at most {cfg.max_query_chars} are allowed")
    return query


def check_k(k: Any, cfg: RetrievalConfig, default: int | None = None) -> int:
    """The one place k is validated and defaulted: 0 means the RPC's default (`default`; Retrieve's is
    retrieval.default_k, Answer passes answer.default_k), anything else must lie in 1..retrieval.max_k."""
    default = cfg.default_k if default is None else default
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= cfg.max_k:
        raise InvalidInput(f"k must be between 1 and {cfg.max_k} (or 0 for the default {default}); got {k!r}")
    return k or default
