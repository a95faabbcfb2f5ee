"""Domain values -> protobuf messages (the reverse of validation.py)."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.struct_pb2 import Struct

from kfresh.core.time import to_timestamp
from kfresh.finetuner.pairs import is_pair
from kfresh.finetuner.registry import AdapterManifest
from kfresh.finetuner.review import ReviewItem
from kfresh.finetuner.scheduler import DistillOutcome, DistillScheduler
from kfresh.indexer.documents import Ack, Hit, IndexStats, LagStats
from kfresh.server.adapters import AdapterChange
from kfresh.server.answer_log import AnswerRecord
from kfresh.server.answerer import AnswerDelta, AnswerResult
from kfresh.server.auth import bearer_token, token_fingerprint
from kfresh.server.purge import PurgeResult
from kfresh.v1 import kfresh_pb2 as pb

ACK_STATUS = {
    "stored": pb.ACK_STATUS_STORED,
    "unchanged": pb.ACK_STATUS_UNCHANGED,
    "deleted": pb.ACK_STATUS_DELETED,
    "not_found": pb.ACK_STATUS_NOT_FOUND,
}


def ack_to_proto(ack: Ack) -> pb.IngestResponse:
    return pb.IngestResponse(
        id=ack.id,
        version=ack.version,
        status=ACK_STATUS[ack.status],
        chunks=ack.chunks,
        seq=ack.seq,
        acked_at=to_timestamp(ack.acked_at),
    )


def hit_to_chunk(hit: Hit) -> pb.Chunk:
    return pb.Chunk(
        doc_id=hit.doc_id,
        version=hit.version,
        chunk_id=hit.chunk_id,
        ordinal=hit.ordinal,
        text=hit.text,
        score=hit.score,
        source=hit.source,
        valid_from=to_timestamp(hit.valid_from),
        metadata=hit.metadata,
        acked_at=to_timestamp(hit.acked_at) if hit.acked_at is not None else None,
    )


def hit_to_citation(hit: Hit, index: int, *, primary: bool) -> pb.Citation:
    return pb.Citation(
        index=index,
        doc_id=hit.doc_id,
        version=hit.version,
        source=hit.source,
        valid_from=to_timestamp(hit.valid_from),
        score=hit.score,
        text=hit.text,
        primary=primary,
        acked_at=to_timestamp(hit.acked_at) if hit.acked_at is not None else None,
    )


def answer_done(result: AnswerResult) -> pb.AnswerDone:
    return pb.AnswerDone(
        citations=[hit_to_citation(h, i, primary=h is result.primary) for i, h in enumerate(result.citations, start=1)],
        superseded=[hit_to_citation(h, 0, primary=False) for h in result.superseded],
        timings=pb.Timings(
            retrieval_ms=result.retrieval_ms,
            time_to_first_token_ms=result.ttft_ms,
            total_ms=result.total_ms,
        ),
        finish_reason=result.finish_reason,
        output_tokens=result.output_tokens,
        model=result.model,
        adapter=result.adapter,
        answer_id=result.request_id,
    )


def purge_response(result: PurgeResult) -> pb.PurgeResponse:
    e, ack = result.erased, result.ack
    deleted = ack.status == "deleted"
    return pb.PurgeResponse(
        id=ack.id, version=ack.version if deleted else 0, seq=ack.seq if deleted else 0, versions=e.versions,
        chunks=e.chunks, citations=e.citations, answers=e.answers, review_items=result.review_items,
        snapshot_written=result.snapshot_written,
    )  # fmt: skip


def answer_event(event: AnswerDelta | AnswerResult) -> pb.AnswerResponse:
    if isinstance(event, AnswerDelta):
        return pb.AnswerResponse(delta=event.text)
    return pb.AnswerResponse(done=answer_done(event))


def logged_answer(rec: AnswerRecord) -> pb.LoggedAnswer:
    primary = rec.primary_hit
    return pb.LoggedAnswer(
        id=rec.id, at=to_timestamp(rec.at), question=rec.question, answer=rec.answer, model=rec.model,
        adapter=rec.adapter, finish_reason=rec.finish_reason, output_tokens=rec.output_tokens,
        closed_book=rec.closed_book, prompt_format=rec.prompt_format,
        citations=[hit_to_citation(h, i, primary=h is primary) for i, h in enumerate(rec.passages, start=1)],
        superseded=[hit_to_citation(h, 0, primary=False) for h in rec.superseded], k=rec.k,
        max_tokens=rec.max_tokens, temperature=rec.temperature,
        filter_json=json.dumps(rec.filters, sort_keys=True) if rec.filters else "",
        timings=pb.Timings(retrieval_ms=rec.retrieval_ms, time_to_first_token_ms=rec.ttft_ms, total_ms=rec.total_ms),
        tenant=rec.tenant, replay_of=rec.replay_of,
    )  # fmt: skip


def lag_to_proto(lag: LagStats) -> pb.LagPercentiles:
    return pb.LagPercentiles(
        p50_ms=lag.p50_ms, p95_ms=lag.p95_ms, p99_ms=lag.p99_ms, max_ms=lag.max_ms, count=lag.count
    )


def stats_to_proto(
    stats: IndexStats,
    *,
    model: str,
    backend: str,
    model_ready: bool,
    uptime_s: float,
    adapter: str = "",
    distiller: DistillScheduler | None = None,
) -> pb.StatsResponse:
    return pb.StatsResponse(
        documents=stats.documents,
        chunks=stats.chunks,
        pending=stats.pending,
        deleted=stats.deleted,
        indexed_vectors=stats.indexed_vectors,
        ingest_docs_per_s=stats.ingest_docs_per_s,
        freshness=lag_to_proto(stats.freshness),
        embedder=stats.embedder,
        index_kind=stats.index_kind,
        index_detail=stats.index_detail,
        index_maintenance_pending=stats.index_maintenance_pending,
        model=model,
        adapter=adapter,
        generation_backend=backend,
        model_ready=model_ready,
        uptime_s=uptime_s,
        history=pb.HistoryStats(
            versions=stats.history.versions,
            replaced_chunks=stats.history.replaced_chunks,
            memory_bytes=stats.history.memory_bytes,
            slice_search=lag_to_proto(stats.history.slice_search),
        ),
        distill=distill_summary(distiller) if distiller is not None else None,
    )


def distill_to_proto(outcome: DistillOutcome) -> pb.DistillResponse:
    return pb.DistillResponse(
        state=pb.DistillResponse.State.Value(outcome.state),
        version=outcome.version,
        facts=outcome.facts,
        new_facts=outcome.new_facts,
        kept_facts=outcome.kept_facts,
        figures=outcome.figures,
        report_path=outcome.report_path,
        message=outcome.message,
        trigger=outcome.trigger,
    )


def distill_summary(distiller: DistillScheduler) -> pb.DistillSummary:
    last = distill_to_proto(distiller.last) if distiller.last is not None else None
    return pb.DistillSummary(running=distiller.running, last=last, runs=distiller.runs)


def adapter_to_proto(
    m: AdapterManifest, *, current: bool = False, loaded: bool = False, standby: bool = False, withdrawn: str = ""
) -> pb.Adapter:
    metrics = Struct()
    # Round-trip through JSON: Struct takes only JSON types, a gate report may hold others.
    metrics.update(json.loads(json.dumps(m.metrics, default=str)))
    return pb.Adapter(
        version=m.version,
        parent=m.parent or "",
        served_name=m.served_name,
        base_model=m.base_model,
        base_model_sha256=m.base_model_sha256,
        training_data_sha256=m.training_data_sha256,
        weights_sha256=m.weights_sha256,
        created_at=to_timestamp(m.created_at),
        facts=m.facts,
        metrics=metrics,
        notes=m.notes,
        current=current,
        loaded=loaded,
        standby=standby,
        withdrawn=withdrawn,
    )


def adapter_change(change: AdapterChange) -> pb.AdapterChangeResponse:
    return pb.AdapterChangeResponse(current=change.current, previous=change.previous, swap_ms=change.swap_ms)


def review_item(item: ReviewItem) -> pb.ReviewItem:
    f = item.fact
    pair = is_pair(f)
    return pb.ReviewItem(
        id=item.id, doc_id=f.doc_id, version=f.version,
        question=f.subject if pair else f"{f.subject} | {f.relation}", answer=f.answer if pair else f.object,
        span=f.object, kind=f.kind if pair else "template", sentence=f.sentence, state=item.state,
        base_wrong=item.base_wrong, cited=item.cited, added_at=to_timestamp(item.added_at), decided_by=item.decided_by,
        decided_at=to_timestamp(item.decided_at) if item.decided_at is not None else None, note=item.note,
    )  # fmt: skip


def reviewer(name: str, metadata: Any) -> str:
    """Who decided: the name the caller gave, and the fingerprint of its bearer token when it sent one."""
    token = bearer_token(metadata)
    who = name.strip() or "anonymous"
    return f"{who} (token {token_fingerprint(token)})" if token else who
