"""Python clients for a kfresh server: `KfreshClient` (blocking) and `AsyncKfreshClient` (asyncio).

with KfreshClient("127.0.0.1:50051") as client:
    client.wait_ready(timeout=120)
    acks = list(client.ingest([document("doc-1", "Some text", source="notes")]))
    for event in client.answer("What does the note say?"):
        ...
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfresh.core.time import to_timestamp
from kfresh.v1 import kfresh_pb2 as pb
from kfresh.v1 import kfresh_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kfresh.core.config import ClientConfig

DEFAULT_ADDR = "127.0.0.1:50051"
SERVICE_NAME = "kfresh.v1.Kfresh"
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def document(
    id: str,
    text: str,
    *,
    source: str = "",
    metadata: dict[str, str] | None = None,
    valid_from: float | None = None,
    supersedes: Iterable[str] = (),
) -> pb.Document:
    """Build a Document message; `valid_from` is unix seconds."""
    doc = pb.Document(id=id, text=text, source=source, metadata=metadata or {}, supersedes=list(supersedes))
    if valid_from is not None:
        doc.valid_from.CopyFrom(to_timestamp(valid_from))
    return doc


def _ingest_request(item: pb.Document | pb.IngestRequest) -> pb.IngestRequest:
    return item if isinstance(item, pb.IngestRequest) else pb.IngestRequest(upsert=item)


def where(
    *,
    equals: Mapping[str, str] | None = None,
    any_of: Mapping[str, Iterable[str]] | None = None,
    source: Iterable[str] = (),
    valid_from_min: float | None = None,
    valid_from_max: float | None = None,
) -> pb.Filter:
    """A Filter message for Retrieve/Answer `where=`: metadata equalities and IN lists, source globs, and a
    valid_from range [min, max) in unix seconds."""
    out = pb.Filter(equals=dict(equals or {}), source=list(source))
    for key, values in (any_of or {}).items():
        out.any_of[key].values.extend(values)
    if valid_from_min is not None:
        out.valid_from_min.CopyFrom(to_timestamp(valid_from_min))
    if valid_from_max is not None:
        out.valid_from_max.CopyFrom(to_timestamp(valid_from_max))
    return out


def _answer_request(question: str, **kw: Any) -> pb.AnswerRequest:
    filters = kw.pop("filter", None) or {}
    times = _times(kw.pop("as_of", None), kw.pop("valid_at", None))
    return pb.AnswerRequest(
        question=question, filter=filters, **times, **{k: v for k, v in kw.items() if v is not None}
    )


def _times(as_of: float | None, valid_at: float | None) -> dict[str, Any]:
    """The as_of / valid_at Timestamp fields of a request (unix seconds in; unset when None)."""
    return {name: to_timestamp(value) for name, value in (("as_of", as_of), ("valid_at", valid_at))
            if value is not None}  # fmt: skip


def tls_credentials(
    *, ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: `ca_file` verifies the server (None = system roots); cert/key = mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def connect_options(cfg: ClientConfig) -> dict[str, Any]:
    """KfreshClient / AsyncKfreshClient keyword arguments from the `client` config section."""
    token = cfg.token.get_secret_value()
    if cfg.token_file is not None:
        from kfresh.core.config import ConfigError

        try:
            token = Path(cfg.token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise ConfigError(
                f"client.token_file: cannot read a token from {cfg.token_file} ({exc.__class__.__name__})"
            ) from None
    secure = cfg.tls_ca_file is not None or cfg.tls_cert_file is not None
    return {
        "token": token or None,
        "credentials": tls_credentials(ca_file=cfg.tls_ca_file, cert_file=cfg.tls_cert_file, key_file=cfg.tls_key_file)
        if secure
        else None,
        "server_name": cfg.tls_server_name or None,
    }


def _channel_options(server_name: str | None) -> list[tuple[str, Any]]:
    return _OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, d: grpc.ClientCallDetails) -> _Details:
        metadata = [*(d.metadata or ()), self._header]
        return _Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary


class _AsyncBearerToken:
    """Adds `authorization: Bearer <token>` to every call of an asyncio channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def _call(self, continuation: Callable[..., Any], d: grpc.aio.ClientCallDetails, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self._header)
        return await continuation(
            grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready), request
        )


def _async_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """grpc.aio files an interceptor under the first call type it implements, so one class per type."""
    kinds = {
        grpc.aio.UnaryUnaryClientInterceptor: "intercept_unary_unary",
        grpc.aio.UnaryStreamClientInterceptor: "intercept_unary_stream",
        grpc.aio.StreamUnaryClientInterceptor: "intercept_stream_unary",
        grpc.aio.StreamStreamClientInterceptor: "intercept_stream_stream",
    }
    return [
        type(f"_Token{base.__name__}", (_AsyncBearerToken, base), {method: _AsyncBearerToken._call})(token)
        for base, method in kinds.items()
    ]


class KfreshClient:
    """Blocking client; every call takes an optional `timeout` (seconds) that becomes the gRPC deadline.

    `token` is sent as `authorization: Bearer <token>`; `credentials` (e.g. `tls_credentials(...)`) turn
    TLS on; `server_name` overrides the name checked against the server certificate.
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.addr = addr
        options = _channel_options(server_name)
        if credentials is None:
            self._channel = grpc.insecure_channel(addr, options=options)
        else:
            self._channel = grpc.secure_channel(addr, credentials, options=options)
        if token:
            self._channel = grpc.intercept_channel(self._channel, _BearerToken(token))
        self._stub = pb_grpc.KfreshStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> KfreshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """Health status of `service` ("" = everything incl. the model; SERVICE_NAME = ingest/retrieve)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status

    def wait_ready(self, *, timeout: float = 180.0, service: str = "") -> None:
        """Block until the server reports SERVING for `service`; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.health(service, timeout=2.0) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"kfresh at {self.addr} not SERVING after {timeout:.0f} s (last error: {last})")

    def ingest(
        self, items: Iterable[pb.Document | pb.IngestRequest], *, timeout: float | None = None
    ) -> Iterator[pb.IngestResponse]:
        """Stream documents (or IngestRequests for deletes); yields one acknowledgement per item."""
        return self._stub.Ingest((_ingest_request(i) for i in items), timeout=timeout)

    def delete(self, doc_id: str, *, timeout: float | None = None) -> pb.DeleteResponse:
        return self._stub.Delete(pb.DeleteRequest(id=doc_id), timeout=timeout)

    def purge(self, doc_id: str, *, timeout: float | None = None) -> pb.PurgeResponse:
        """Erase a document (admin): every version, chunk, vector, citation, logged answer and review item."""
        return self._stub.Purge(pb.PurgeRequest(id=doc_id), timeout=timeout)

    def retrieve(
        self,
        query: str,
        *,
        k: int = 0,
        filter: dict[str, str] | None = None,
        where: pb.Filter | None = None,
        min_seq: int = 0,
        as_of: float | None = None,
        valid_at: float | None = None,
        timeout: float | None = None,
    ) -> pb.RetrieveResponse:
        """The best k chunks among those matching `filter` (metadata equalities) and `where` (see `where()`).
        `min_seq`: wait until the server has applied that change (an ack's seq; see `Session`).
        `as_of` / `valid_at` (unix seconds): the knowledge base as it stood then / what was true then."""
        request = pb.RetrieveRequest(
            query=query, k=k, filter=filter or {}, where=where, min_seq=min_seq, **_times(as_of, valid_at)
        )
        return self._stub.Retrieve(request, timeout=timeout)

    def answer(self, question: str, *, timeout: float | None = None, **options: Any) -> Iterator[pb.AnswerResponse]:
        """Stream an answer: events with `delta` text, then one with `done` (citations, timings).

        Options: k, filter, where (see `where()`), closed_book, max_tokens, temperature, adapter, min_seq,
        as_of / valid_at (unix seconds: answer from the knowledge base as it stood then / what was true then).
        """
        return self._stub.Answer(_answer_request(question, **options), timeout=timeout)

    def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return self._stub.Stats(pb.StatsRequest(), timeout=timeout)

    def get_answer(self, answer_id: str, *, timeout: float | None = None) -> pb.LoggedAnswer:
        """An answer from the server's answer log (admin): question, passages shown with versions, adapter, text."""
        return self._stub.GetAnswer(pb.GetAnswerRequest(id=answer_id), timeout=timeout)

    def replay_answer(self, answer_id: str, *, timeout: float | None = None) -> Iterator[pb.AnswerResponse]:
        """Ask a logged answer again with the same passages and adapter (admin); streams like `answer`."""
        return self._stub.ReplayAnswer(pb.ReplayAnswerRequest(id=answer_id), timeout=timeout)

    def wait_searchable(self, timeout_s: float = 30.0, *, timeout: float | None = None) -> pb.WaitSearchableResponse:
        """Block until everything the server had acknowledged is searchable (`searchable` False after timeout_s)."""
        return self._stub.WaitSearchable(
            pb.WaitSearchableRequest(timeout_s=timeout_s), timeout=_wait_deadline(timeout_s, timeout)
        )

    def watch(self, *, after_seq: int = 0, from_now: bool = False, timeout: float | None = None) -> Iterator[pb.Change]:
        """Stream each document change once it is searchable (seq, id, version, op, lag_ms, ...): the change log
        after `after_seq` (0 = all of it; `from_now` = only new ones), then live. Cancel the call to stop."""
        return self._stub.Watch(pb.WatchRequest(after_seq=after_seq, from_now=from_now), timeout=timeout)

    def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        """Adapter versions in the server's registry; which is served, loaded, the rollback target."""
        return self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)

    def promote_adapter(self, version: str, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        """Serve `version` (e.g. "v0003") for new requests; in-flight ones finish on their adapter."""
        return self._stub.PromoteAdapter(pb.PromoteAdapterRequest(version=version), timeout=timeout)

    def rollback_adapter(self, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        """Serve the previously served version again (the base model when there is none)."""
        return self._stub.RollbackAdapter(pb.RollbackAdapterRequest(), timeout=timeout)

    def distill(self, *, dry_run: bool = False, wait: bool = False, timeout: float | None = None) -> pb.DistillResponse:
        """Ask the server to distil (one run at a time; `wait` blocks until it is gated and maybe published)."""
        return self._stub.Distill(pb.DistillRequest(dry_run=dry_run, wait=wait), timeout=timeout)

    def list_review(
        self, *, state: str = "", limit: int = 0, item: int = 0, timeout: float | None = None
    ) -> pb.ListReviewResponse:
        """The review queue, pending items first (`item`: only that one)."""
        return self._stub.ListReview(pb.ListReviewRequest(state=state, limit=limit, id=item), timeout=timeout)

    def decide_review(
        self, ids: Sequence[int], *, approve: bool, reviewer: str, note: str = "", timeout: float | None = None
    ) -> pb.DecideReviewResponse:
        """Approve (or reject) review items; only approved items train."""
        return self._stub.DecideReview(_decision(ids, approve, reviewer, note), timeout=timeout)


class Session:
    """Read your own writes on any replica: remembers the newest seq this session's writes were acknowledged
    with, and makes its reads wait (`min_seq`, bounded by the server's retrieval.min_seq_wait_s) until the
    replica that serves them has applied it.

        session = Session()
        list(session.ingest(replica_a, [document("faq", "...")]))
        session.retrieve(replica_b, "faq")  # sees the write, or UNAVAILABLE with how far replica_b is
    """

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq

    def note(self, seq: int) -> None:
        """Count a write made elsewhere (its ack's seq)."""
        self.seq = max(self.seq, seq)

    def ingest(
        self, client: KfreshClient, items: Iterable[pb.Document | pb.IngestRequest], **kw: Any
    ) -> Iterator[pb.IngestResponse]:
        for ack in client.ingest(items, **kw):
            self.note(ack.seq)
            yield ack

    def delete(self, client: KfreshClient, doc_id: str, **kw: Any) -> pb.DeleteResponse:
        reply = client.delete(doc_id, **kw)
        self.note(reply.seq)
        return reply

    def retrieve(self, client: KfreshClient, query: str, **kw: Any) -> pb.RetrieveResponse:
        return client.retrieve(query, min_seq=self.seq, **kw)

    def answer(self, client: KfreshClient, question: str, **kw: Any) -> Iterator[pb.AnswerResponse]:
        return client.answer(question, min_seq=self.seq, **kw)


class AsyncKfreshClient:
    """asyncio client with the same methods and options as KfreshClient (streams are async iterators)."""

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.addr = addr
        options = _channel_options(server_name)
        interceptors = _async_token_interceptors(token) if token else None
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(addr, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(addr, credentials, options=options, interceptors=interceptors)
        self._stub = pb_grpc.KfreshStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncKfreshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, service: str = "", timeout: float = 5.0) -> int:
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return reply.status

    def ingest(
        self,
        items: Iterable[pb.Document | pb.IngestRequest] | AsyncIterable[pb.Document | pb.IngestRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.IngestResponse]:
        if isinstance(items, AsyncIterable):

            async def requests() -> AsyncIterator[pb.IngestRequest]:
                async for item in items:
                    yield _ingest_request(item)

            return self._stub.Ingest(requests(), timeout=timeout)
        return self._stub.Ingest((_ingest_request(i) for i in items), timeout=timeout)

    async def delete(self, doc_id: str, *, timeout: float | None = None) -> pb.DeleteResponse:
        return await self._stub.Delete(pb.DeleteRequest(id=doc_id), timeout=timeout)

    async def purge(self, doc_id: str, *, timeout: float | None = None) -> pb.PurgeResponse:
        return await self._stub.Purge(pb.PurgeRequest(id=doc_id), timeout=timeout)

    async def retrieve(
        self,
        query: str,
        *,
        k: int = 0,
        filter: dict[str, str] | None = None,
        where: pb.Filter | None = None,
        min_seq: int = 0,
        as_of: float | None = None,
        valid_at: float | None = None,
        timeout: float | None = None,
    ) -> pb.RetrieveResponse:
        request = pb.RetrieveRequest(
            query=query, k=k, filter=filter or {}, where=where, min_seq=min_seq, **_times(as_of, valid_at)
        )
        return await self._stub.Retrieve(request, timeout=timeout)

    def answer(
        self, question: str, *, timeout: float | None = None, **options: Any
    ) -> AsyncIterator[pb.AnswerResponse]:
        return self._stub.Answer(_answer_request(question, **options), timeout=timeout)

    async def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return await self._stub.Stats(pb.StatsRequest(), timeout=timeout)

    async def get_answer(self, answer_id: str, *, timeout: float | None = None) -> pb.LoggedAnswer:
        return await self._stub.GetAnswer(pb.GetAnswerRequest(id=answer_id), timeout=timeout)

    def replay_answer(self, answer_id: str, *, timeout: float | None = None) -> AsyncIterator[pb.AnswerResponse]:
        return self._stub.ReplayAnswer(pb.ReplayAnswerRequest(id=answer_id), timeout=timeout)

    async def wait_searchable(
        self, timeout_s: float = 30.0, *, timeout: float | None = None
    ) -> pb.WaitSearchableResponse:
        return await self._stub.WaitSearchable(
            pb.WaitSearchableRequest(timeout_s=timeout_s), timeout=_wait_deadline(timeout_s, timeout)
        )

    def watch(
        self, *, after_seq: int = 0, from_now: bool = False, timeout: float | None = None
    ) -> AsyncIterator[pb.Change]:
        return self._stub.Watch(pb.WatchRequest(after_seq=after_seq, from_now=from_now), timeout=timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        return await self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)

    async def promote_adapter(self, version: str, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        return await self._stub.PromoteAdapter(pb.PromoteAdapterRequest(version=version), timeout=timeout)

    async def rollback_adapter(self, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        return await self._stub.RollbackAdapter(pb.RollbackAdapterRequest(), timeout=timeout)

    async def distill(
        self, *, dry_run: bool = False, wait: bool = False, timeout: float | None = None
    ) -> pb.DistillResponse:
        return await self._stub.Distill(pb.DistillRequest(dry_run=dry_run, wait=wait), timeout=timeout)

    async def list_review(
        self, *, state: str = "", limit: int = 0, item: int = 0, timeout: float | None = None
    ) -> pb.ListReviewResponse:
        return await self._stub.ListReview(pb.ListReviewRequest(state=state, limit=limit, id=item), timeout=timeout)

    async def decide_review(
        self, ids: Sequence[int], *, approve: bool, reviewer: str, note: str = "", timeout: float | None = None
    ) -> pb.DecideReviewResponse:
        return await self._stub.DecideReview(_decision(ids, approve, reviewer, note), timeout=timeout)


def _decision(ids: Sequence[int], approve: bool, reviewer: str, note: str) -> pb.DecideReviewRequest:
    decision = pb.DecideReviewRequest.APPROVE if approve else pb.DecideReviewRequest.REJECT
    return pb.DecideReviewRequest(ids=list(ids), decision=decision, reviewer=reviewer, note=note)


def _wait_deadline(timeout_s: float, timeout: float | None) -> float:
    """The RPC deadline of a WaitSearchable: the server's wait plus slack (the server rejects a bad timeout_s)."""
    if timeout is not None:
        return timeout
    return (timeout_s if timeout_s == timeout_s and 0 <= timeout_s <= 3600 else 0.0) + 30.0
