"""Tenants that cannot see each other: a token's binding (e.g. tenant=acme, from server/auth.py) applied to
every request made with it.

- Retrieve and Answer: the binding is added to the request's filter; a filter naming another value for a
  bound key is refused (PERMISSION_DENIED), so a request can narrow its tenant's view but never widen it.
  Filtered search is exact (indexer/search.py), so a reply holds only the tenant's chunks, and all of its
  best ones.
- Ingest: the binding is stamped on every document's metadata; a document naming another value, or an id
  that a live document of another tenant holds, is refused.
- Delete: a document outside the binding is NOT_FOUND, as if it did not exist.

Document ids stay one namespace: two tenants cannot both hold id "faq". Ownership is checked inside the write's
own store transaction (`WriteOp.owner`), so of two tenants racing to create the same new id, the first to commit
holds it and the other is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from kfresh.core.errors import Forbidden
from kfresh.indexer.documents import DocumentIn
from kfresh.indexer.filters import Filter

Binding = Mapping[str, str]


def bind_filters(filters: Filter | Mapping[str, str], binding: Binding) -> Filter:
    """The request's filter with the binding added; Forbidden when the request names another value for a bound
    key (in its equalities or its IN lists)."""
    chosen = filters if isinstance(filters, Filter) else Filter(equals=dict(filters))
    for key, value in binding.items():
        if key in chosen.equals and chosen.equals[key] != value:
            raise Forbidden(f"this token is bound to {key}={value}; the filter asks for {key}={chosen.equals[key]}")
        others = sorted(set(chosen.any_of.get(key, ())) - {value})
        if others:
            raise Forbidden(f"this token is bound to {key}={value}; the filter asks for {key} in {others}")
    return chosen.with_equals(binding)


def bind_document(doc: DocumentIn, binding: Binding) -> DocumentIn:
    """`doc` with the binding stamped on its metadata; Forbidden when the document names another value."""
    if not binding:
        return doc
    for key, value in binding.items():
        if key in doc.metadata and doc.metadata[key] != value:
            raise Forbidden(
                f"document {doc.id!r}: this token is bound to {key}={value}; the document says {key}={doc.metadata[key]}"
            )
    return replace(doc, metadata={**doc.metadata, **binding})


def owns(metadata: Mapping[str, str] | None, binding: Binding) -> bool:
    """Whether a live document with `metadata` (None: no live document) is inside the binding."""
    return metadata is None or all(metadata.get(k) == v for k, v in binding.items())
