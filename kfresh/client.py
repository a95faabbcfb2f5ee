"""Python clients for a kfresh server: `KfreshClient` (blocking) and `AsyncKfreshClient` (asyncio).

    with KfreshClient("127.0.0.1:50051") as client:
        client.wait_ready(timeout=120)
        acks = list(client.ingest([document("doc-1", "Some text", source="notes")]))
        for event in client.answer("What does the note say?"):
            ...
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kfresh.v1 import kfresh_pb2 as pb
from kfresh.v1 import kfresh_pb2_grpc as pb_grpc

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
        ts = Timestamp()
        ts.FromNanoseconds(int(valid_from * 1e9))
        doc.valid_from.CopyFrom(ts)
    return doc


def _ingest_request(item: pb.Document | pb.IngestRequest) -> pb.IngestRequest:
    return item if isinstance(item, pb.IngestRequest) else pb.IngestRequest(upsert=item)


def _answer_request(question: str, **kw: Any) -> pb.AnswerRequest:
    filters = kw.pop("filter", None) or {}
    return pb.AnswerRequest(question=question, filter=filters, **{k: v for k, v in kw.items() if v is not None})


class KfreshClient:
    """Blocking client; every call takes an optional `timeout` (seconds) that becomes the gRPC deadline."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.addr = addr
        if credentials is None:
            self._channel = grpc.insecure_channel(addr, options=_OPTIONS)
        else:
            self._channel = grpc.secure_channel(addr, credentials, options=_OPTIONS)
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

    def ingest(self, items: Iterable[pb.Document | pb.IngestRequest], *, timeout: float | None = None) -> Iterator[pb.IngestResponse]:
        """Stream documents (or IngestRequests for deletes); yields one acknowledgement per item."""
        return self._stub.Ingest((_ingest_request(i) for i in items), timeout=timeout)

    def delete(self, doc_id: str, *, timeout: float | None = None) -> pb.DeleteResponse:
        return self._stub.Delete(pb.DeleteRequest(id=doc_id), timeout=timeout)

    def retrieve(self, query: str, *, k: int = 0, filter: dict[str, str] | None = None, timeout: float | None = None) -> pb.RetrieveResponse:
        return self._stub.Retrieve(pb.RetrieveRequest(query=query, k=k, filter=filter or {}), timeout=timeout)

    def answer(self, question: str, *, timeout: float | None = None, **options: Any) -> Iterator[pb.AnswerResponse]:
        """Stream an answer: events with `delta` text, then one with `done` (citations, timings).

        Options: k, filter, closed_book, max_tokens, temperature, adapter.
        """
        return self._stub.Answer(_answer_request(question, **options), timeout=timeout)

    def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return self._stub.Stats(pb.StatsRequest(), timeout=timeout)

    def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        """Adapter versions in the server's registry; which is served, loaded, the rollback target."""
        return self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)

    def promote_adapter(self, version: str, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        """Serve `version` (e.g. "v0003") for new requests; in-flight ones finish on their adapter."""
        return self._stub.PromoteAdapter(pb.PromoteAdapterRequest(version=version), timeout=timeout)

    def rollback_adapter(self, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        """Serve the previously served version again (the base model when there is none)."""
        return self._stub.RollbackAdapter(pb.RollbackAdapterRequest(), timeout=timeout)


class AsyncKfreshClient:
    """asyncio client with the same methods as KfreshClient (streams are async iterators)."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.addr = addr
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(addr, options=_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(addr, credentials, options=_OPTIONS)
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
        self, items: Iterable[pb.Document | pb.IngestRequest] | AsyncIterable[pb.Document | pb.IngestRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.IngestResponse]:
        if isinstance(items, AsyncIterable):
            async def requests() -> AsyncIterator[pb.IngestRequest]:
                async for item in items:  # type: ignore[union-attr]
                    yield _ingest_request(item)

            return self._stub.Ingest(requests(), timeout=timeout)
        return self._stub.Ingest((_ingest_request(i) for i in items), timeout=timeout)

    async def delete(self, doc_id: str, *, timeout: float | None = None) -> pb.DeleteResponse:
        return await self._stub.Delete(pb.DeleteRequest(id=doc_id), timeout=timeout)

    async def retrieve(self, query: str, *, k: int = 0, filter: dict[str, str] | None = None, timeout: float | None = None) -> pb.RetrieveResponse:
        return await self._stub.Retrieve(pb.RetrieveRequest(query=query, k=k, filter=filter or {}), timeout=timeout)

    def answer(self, question: str, *, timeout: float | None = None, **options: Any) -> AsyncIterator[pb.AnswerResponse]:
        return self._stub.Answer(_answer_request(question, **options), timeout=timeout)

    async def stats(self, *, timeout: float | None = None) -> pb.StatsResponse:
        return await self._stub.Stats(pb.StatsRequest(), timeout=timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        return await self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)

    async def promote_adapter(self, version: str, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        return await self._stub.PromoteAdapter(pb.PromoteAdapterRequest(version=version), timeout=timeout)

    async def rollback_adapter(self, *, timeout: float | None = None) -> pb.AdapterChangeResponse:
        return await self._stub.RollbackAdapter(pb.RollbackAdapterRequest(), timeout=timeout)
