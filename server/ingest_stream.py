"""An Ingest stream as group commits: the messages already received are written in one store transaction.

A reader task drains the request stream into a bounded buffer while the previous group commits, so under
load each transaction (one durable flush, one thread hop) carries many documents, and a lone document
still commits at once. Acks keep the stream's order. A message that fails validation ends the stream with
INVALID_ARGUMENT naming its position, after every message before it has been acknowledged, as before.
With a tenant binding (server/tenancy.py) every document is stamped with it, and a message about a live
document of another tenant ends the stream the same way, with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from kfresh.core.errors import Forbidden, InvalidInput, Unavailable
from kfresh.indexer.documents import Ack, WriteOp
from kfresh.indexer.service import Indexer
from kfresh.server import tenancy, validation
from kfresh.v1 import kfresh_pb2 as pb

_END = object()


async def read_groups(
    requests: AsyncIterator[pb.IngestRequest], max_items: int
) -> AsyncIterator[list[pb.IngestRequest]]:
    """Yield lists of up to `max_items` requests: whatever has arrived, waiting only for the first."""
    buffer: asyncio.Queue[object] = asyncio.Queue(maxsize=2 * max_items)  # bounded: HTTP/2 flow control pushes back

    async def pump() -> None:
        try:
            async for req in requests:
                await buffer.put(req)
            await buffer.put(_END)
        except Exception as exc:  # the client went away or sent garbage: surface it in the handler
            await buffer.put(exc)

    reader = asyncio.create_task(pump())
    try:
        while True:
            group: list[pb.IngestRequest] = []
            item = await buffer.get()
            while True:
                if item is _END:
                    if group:
                        yield group
                    return
                if isinstance(item, Exception):
                    if group:
                        yield group
                    raise item
                group.append(item)  # type: ignore[arg-type]
                if len(group) >= max_items or buffer.empty():
                    break
                item = buffer.get_nowait()
            yield group
    finally:
        reader.cancel()


def to_op(req: pb.IngestRequest, binding: tenancy.Binding | None = None) -> WriteOp:
    validation.reject_unknown_fields(req)
    op = req.WhichOneof("op")
    owner = binding or None  # checked in the write's transaction: no other tenant's live document is touched
    if op == "upsert":
        doc = tenancy.bind_document(validation.document_from_proto(req.upsert), binding or {})
        return WriteOp(doc.id, doc, owner=owner)
    if op == "delete_id":
        return WriteOp(validation.check_doc_id(req.delete_id, "delete_id"), owner=owner)
    raise InvalidInput("request has neither upsert nor delete_id")


async def ingest(
    indexer: Indexer,
    requests: AsyncIterator[pb.IngestRequest],
    *,
    max_group: int,
    binding: tenancy.Binding | None = None,
) -> AsyncIterator[tuple[WriteOp, Ack]]:
    """(op, ack) per message, in order; each ack only after its group's transaction committed."""
    position = 0
    async for group in read_groups(requests, max_group):
        ops: list[WriteOp] = []
        bad: InvalidInput | Forbidden | None = None
        for req in group:
            try:
                ops.append(to_op(req, binding))
            except (InvalidInput, Forbidden) as exc:
                bad = type(exc)(f"ingest message #{position + len(ops) + 1}: {exc}")
                break
        async for pair in _commit(indexer, ops, first=position + 1):
            yield pair
        position += len(ops)
        if bad is not None:
            raise bad


async def _commit(indexer: Indexer, ops: list[WriteOp], *, first: int) -> AsyncIterator[tuple[WriteOp, Ack]]:
    """write_many over `ops`; it may take only a prefix (queue room). If the indexer rejects one op, the group
    is redone one op at a time so that every op before the bad one is acknowledged."""
    done, single = 0, False
    while done < len(ops):
        part = ops[done : done + 1] if single else ops[done:]
        try:
            acks = await asyncio.to_thread(indexer.write_many, part)
        except InvalidInput as exc:
            if len(part) > 1:
                single = True
                continue
            raise InvalidInput(f"ingest message #{first + done}: {exc}") from None
        for i, (op, ack) in enumerate(zip(part, acks)):
            if ack.status == "forbidden":  # the store found another tenant's live document under this id
                raise Forbidden(f"ingest message #{first + done + i}: document {op.doc_id!r} belongs to another tenant")
            yield op, ack
        done += len(acks)


async def wait_applied(indexer: Indexer, target: int, timeout_s: float, *, recheck_s: float = 0.1) -> int:
    """Wait until the in-memory watermark reaches `target` or `timeout_s` passes; returns the watermark.
    The worker wakes this coroutine after each applied batch (no polling: a 5 ms poll loop took the GIL 200
    times a second from the embedding worker); `recheck_s` only bounds a missed wake-up."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def on_applied() -> None:  # the worker thread
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            loop.call_soon_threadsafe(wake.set)

    start = time.monotonic()
    with indexer.applied_listener(on_applied):
        while True:
            wake.clear()  # before the check: a batch applied after it sets the event again
            applied = indexer.applied_seq()
            left = timeout_s - (time.monotonic() - start)
            if applied >= target or left <= 0:
                return applied
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(left, recheck_s))


async def wait_searchable(indexer: Indexer, timeout_s: float) -> pb.WaitSearchableResponse:
    """Wait until the watermark reaches the newest change acknowledged at the moment of the call."""
    target = indexer.acked_seq()
    start = time.monotonic()
    applied = await wait_applied(indexer, target, timeout_s)
    return pb.WaitSearchableResponse(
        searchable=applied >= target,
        target_seq=target,
        applied_seq=max(applied, 0),
        waited_ms=(time.monotonic() - start) * 1000,
    )


async def require_applied(indexer: Indexer, min_seq: int, timeout_s: float) -> None:
    """Read your writes: return once every change up to `min_seq` is in this replica's index; InvalidInput for a
    negative one, Unavailable (with how far this replica is) when it is not there within `timeout_s`."""
    if min_seq < 0:
        raise InvalidInput(f"min_seq must be >= 0; got {min_seq}")
    if min_seq == 0 or indexer.applied_seq() >= min_seq:
        return
    applied = await wait_applied(indexer, min_seq, timeout_s)
    if applied < min_seq:
        raise Unavailable(
            f"this replica has applied the changes up to seq {applied}, not yet seq {min_seq} (waited "
            f"{timeout_s:g} s); retry in a moment or on another replica"
        )
