"""Thin gRPC servicer: decode + validate, call the domain, encode. Errors map in server/errors.py."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from kfresh.core import metrics
from kfresh.core.config import KfreshConfig
from kfresh.core.errors import InvalidInput, NotFound, Unavailable
from kfresh.indexer.documents import WriteOp
from kfresh.indexer.validation import check_k
from kfresh.server import cancellable, convert, ingest_stream, purge, tenancy, validation, watch
from kfresh.server.adapters import AdapterManager, read_only_statuses
from kfresh.server.answer_log import AnswerLog
from kfresh.server.answerer import Answerer
from kfresh.server.auth import TokenTable
from kfresh.server.errors import rpc
from kfresh.server.generation.base import GenerationBackend
from kfresh.v1 import kfresh_pb2 as pb
from kfresh.v1 import kfresh_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kfresh.finetuner.review import ReviewQueue
    from kfresh.finetuner.scheduler import DistillScheduler
    from kfresh.indexer.service import Indexer


PURGE_WAIT_S = 30.0  # how long a purge waits for its delete to reach the index and a snapshot


class Runtime:
    """What the servicer talks to; the indexer appears once it has loaded (UNAVAILABLE before)."""

    def __init__(
        self,
        cfg: KfreshConfig,
        backend: GenerationBackend,
        *,
        adapters: AdapterManager | None = None,
        tokens: TokenTable | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.backend = backend
        self.adapters = adapters
        self.indexer: Indexer | None = None
        self.answerer: Answerer | None = None
        self.answer_log: AnswerLog | None = None
        self.feed: watch.ChangeFeed | None = None
        self.distiller: DistillScheduler | None = None
        self.started_at = time.monotonic()
        self._review: ReviewQueue | None = None

    def attach_indexer(self, indexer: Indexer) -> None:
        self.indexer = indexer
        if self.cfg.answer_log.enabled:
            self.answer_log = AnswerLog(indexer, self.cfg.answer_log)
        self.answerer = Answerer(
            indexer, self.backend, self.cfg.answer, adapters=self.adapters, answer_log=self.answer_log
        )
        self.feed = watch.ChangeFeed(indexer)

    def binding(self, context: grpc.aio.ServicerContext) -> dict[str, str]:
        """The tenant binding of the caller's token ({} without authentication or for an unbound token)."""
        return self.tokens.binding(context.invocation_metadata()) if self.tokens else {}  # an empty table: no auth

    def require_indexer(self) -> Indexer:
        if self.indexer is None:
            raise Unavailable("the index is still loading; retry shortly")
        return self.indexer

    def require_feed(self) -> watch.ChangeFeed:
        self.require_indexer()
        assert self.feed is not None  # made with the indexer
        return self.feed

    def require_answerer(self) -> Answerer:
        self.require_indexer()
        assert self.answerer is not None
        return self.answerer

    def require_answer_log(self) -> AnswerLog:
        self.require_indexer()
        if self.answer_log is None:
            raise NotFound("this server keeps no answer log (answer_log.enabled=false)")
        return self.answer_log

    def require_distiller(self) -> DistillScheduler:
        if self.distiller is None:
            raise Unavailable("distillation is not available yet; retry shortly")
        return self.distiller

    def review(self) -> ReviewQueue:
        """The review queue (opened on first use; the distillation worker writes the same file)."""
        if self._review is None:
            from kfresh.finetuner.review import QUEUE_FILE, ReviewQueue

            self._review = ReviewQueue(Path(self.cfg.finetune.work_dir) / QUEUE_FILE)
        return self._review

    def close(self) -> None:
        if self._review is not None:
            self._review.close()
            self._review = None

    def require_adapters(self) -> AdapterManager:
        if self.adapters is None:
            raise InvalidInput("this server serves no adapters: start it with --generation.enable_lora true")
        return self.adapters


class KfreshServicer(pb_grpc.KfreshServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    @rpc
    async def Ingest(
        self, request_iterator: AsyncIterator[pb.IngestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResponse]:
        indexer = self._rt.require_indexer()
        async for op, ack in ingest_stream.ingest(
            indexer, request_iterator, max_group=self._rt.cfg.store.group_commit_max, binding=self._rt.binding(context)
        ):
            metrics.DOCUMENTS_ACKED.labels(op="delete_id" if op.doc is None else "upsert", status=ack.status).inc()
            yield convert.ack_to_proto(ack)

    @rpc
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        validation.reject_unknown_fields(request)
        doc_id = validation.check_doc_id(request.id)
        # A tenant-bound token deletes only its tenant's documents; another tenant's looks absent (NOT_FOUND).
        op = WriteOp(doc_id, owner=self._rt.binding(context) or None)
        (ack,) = await asyncio.to_thread(self._rt.require_indexer().write_many, [op])
        if ack.status in ("not_found", "forbidden"):
            raise NotFound(f"document {doc_id!r} does not exist")
        metrics.DOCUMENTS_ACKED.labels(op="delete_id", status=ack.status).inc()
        return pb.DeleteResponse(id=ack.id, version=ack.version, seq=ack.seq)

    @rpc
    async def Purge(self, request: pb.PurgeRequest, context: grpc.aio.ServicerContext) -> pb.PurgeResponse:
        validation.reject_unknown_fields(request)
        doc_id = validation.check_doc_id(request.id)
        indexer = self._rt.require_indexer()
        binding = self._rt.binding(context)
        if binding:  # a deleted document is still its tenant's to purge, and never another tenant's
            stored = await asyncio.to_thread(functools.partial(indexer.live_metadata, [doc_id], deleted_too=True))
            if doc_id not in stored or not tenancy.owns(stored[doc_id], binding):
                raise NotFound(f"document {doc_id!r} does not exist")
        result = await purge.purge(indexer, doc_id, self._rt.review(), timeout_s=PURGE_WAIT_S)
        return convert.purge_response(result)

    @rpc
    async def Retrieve(self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext) -> pb.RetrieveResponse:
        query = validation.retrieve_query(request, self._rt.cfg.retrieval)
        indexer = self._rt.require_indexer()
        await ingest_stream.require_applied(indexer, request.min_seq, self._rt.cfg.retrieval.min_seq_wait_s)
        start = time.perf_counter()
        filters = tenancy.bind_filters(query.filters, self._rt.binding(context))
        hits = await cancellable.in_thread(
            indexer.search, query.query, query.k, filters or None, as_of=query.as_of, valid_at=query.valid_at
        )
        elapsed_ms = (time.perf_counter() - start) * 1000
        metrics.RETRIEVE_DURATION.observe(elapsed_ms / 1000)
        k = check_k(query.k, self._rt.cfg.retrieval)  # already accepted by the search: this only resolves 0
        return pb.RetrieveResponse(
            chunks=[convert.hit_to_chunk(h) for h in hits], retrieval_ms=elapsed_ms, all_matches=len(hits) < k
        )

    @rpc
    async def Answer(
        self, request: pb.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerResponse]:
        query = validation.answer_query(request, self._rt.cfg.answer, self._rt.cfg.retrieval)
        binding = self._rt.binding(context)
        query = replace(query, filters=tenancy.bind_filters(query.filters, binding), tenant=binding)
        if request.min_seq:
            indexer = self._rt.require_indexer()
            await ingest_stream.require_applied(indexer, request.min_seq, self._rt.cfg.retrieval.min_seq_wait_s)
        async for event in self._rt.require_answerer().answer(query):
            yield convert.answer_event(event)

    @rpc
    async def GetAnswer(self, request: pb.GetAnswerRequest, context: grpc.aio.ServicerContext) -> pb.LoggedAnswer:
        validation.reject_unknown_fields(request)
        answer_id = validation.check_answer_id(request.id)
        rec = await self._rt.require_answer_log().get(answer_id, tenant=self._rt.binding(context))
        return convert.logged_answer(rec)

    @rpc
    async def ReplayAnswer(
        self, request: pb.ReplayAnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnswerResponse]:
        validation.reject_unknown_fields(request)
        answer_id = validation.check_answer_id(request.id)
        rec = await self._rt.require_answer_log().get(answer_id, tenant=self._rt.binding(context))
        async for event in self._rt.require_answerer().replay(rec):
            yield convert.answer_event(event)

    @rpc
    async def WaitSearchable(
        self, request: pb.WaitSearchableRequest, context: grpc.aio.ServicerContext
    ) -> pb.WaitSearchableResponse:
        timeout_s = validation.wait_timeout(request)
        return await ingest_stream.wait_searchable(self._rt.require_indexer(), timeout_s)

    @rpc
    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Change]:
        validation.reject_unknown_fields(request)
        indexer = self._rt.require_indexer()
        async for change in self._rt.require_feed().watch(watch.start_seq(request, indexer), self._rt.binding(context)):
            yield change

    @rpc
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        validation.reject_unknown_fields(request)
        indexer = self._rt.require_indexer()
        stats = await asyncio.to_thread(indexer.stats)
        binding = self._rt.binding(context)
        reply = convert.stats_to_proto(
            stats,
            model=self._rt.backend.model,
            backend=self._rt.backend.name,
            model_ready=self._rt.backend.ready,
            uptime_s=time.monotonic() - self._rt.started_at,
            adapter=self._rt.adapters.current_version if self._rt.adapters else "",
            distiller=self._rt.distiller,
        )
        if binding:
            docs, chunks = await asyncio.to_thread(indexer.count_matching, binding)
            reply.tenant.CopyFrom(pb.TenantStats(binding=binding, documents=docs, chunks=chunks))
        return reply

    @rpc
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        validation.reject_unknown_fields(request)
        manager = self._rt.adapters
        if manager is None:
            statuses, current = await asyncio.to_thread(read_only_statuses, self._rt.cfg.finetune.registry_dir)
        else:
            statuses, current = await manager.list_adapters(), manager.current_version
        return pb.ListAdaptersResponse(
            adapters=[
                convert.adapter_to_proto(
                    s.manifest, current=s.current, loaded=s.loaded, standby=s.standby, withdrawn=s.withdrawn
                )
                for s in statuses
            ],
            current=current,
            enabled=manager is not None,
        )

    @rpc
    async def PromoteAdapter(
        self, request: pb.PromoteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterChangeResponse:
        validation.reject_unknown_fields(request)
        return convert.adapter_change(await self._rt.require_adapters().promote(request.version))

    @rpc
    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterChangeResponse:
        validation.reject_unknown_fields(request)
        return convert.adapter_change(await self._rt.require_adapters().rollback())

    @rpc
    async def Distill(self, request: pb.DistillRequest, context: grpc.aio.ServicerContext) -> pb.DistillResponse:
        validation.reject_unknown_fields(request)
        outcome = await self._rt.require_distiller().request(dry_run=request.dry_run, wait=request.wait)
        return convert.distill_to_proto(outcome)

    @rpc
    async def ListReview(
        self, request: pb.ListReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReviewResponse:
        validation.reject_unknown_fields(request)
        queue = self._rt.review()
        if request.id:
            items = [await asyncio.to_thread(queue.get, request.id)]
        else:
            items = await asyncio.to_thread(queue.items, state=request.state, limit=max(request.limit, 0))
        counts = await asyncio.to_thread(queue.counts)
        return pb.ListReviewResponse(items=[convert.review_item(i) for i in items], counts=counts,
                                     required=self._rt.cfg.finetune.require_review)  # fmt: skip

    @rpc
    async def DecideReview(
        self, request: pb.DecideReviewRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecideReviewResponse:
        validation.reject_unknown_fields(request)
        state = validation.review_decision(request.decision)
        by = convert.reviewer(request.reviewer, context.invocation_metadata())
        items = await asyncio.to_thread(self._rt.review().decide, list(request.ids), state, by=by, note=request.note)
        return pb.DecideReviewResponse(items=[convert.review_item(i) for i in items])
