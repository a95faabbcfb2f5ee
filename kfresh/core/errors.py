"""Domain errors, free of gRPC: the server maps each kind to one status code (server/errors.py)."""

from __future__ import annotations


class KfreshError(Exception):
    """Base of the per-request errors; the message is safe to show to a client."""


class InvalidInput(KfreshError):
    """The request is malformed or out of bounds (-> INVALID_ARGUMENT)."""


class NotFound(KfreshError):
    """The named document or adapter does not exist (-> NOT_FOUND)."""


class Forbidden(KfreshError):
    """The caller's token does not allow this, e.g. a filter outside its tenant (-> PERMISSION_DENIED)."""


class Overloaded(KfreshError):
    """A bounded queue or concurrency limit is full; retry later (-> RESOURCE_EXHAUSTED)."""


class Unavailable(KfreshError):
    """A component is not ready or has failed (-> UNAVAILABLE)."""


class Cancelled(KfreshError):
    """The caller went away (its RPC was cancelled or ran out of time): the work stopped early (-> CANCELLED)."""


class StorageFull(Overloaded):
    """The disk (or the store's size limit) is full: the write was not committed (-> RESOURCE_EXHAUSTED)."""
