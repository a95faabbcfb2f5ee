"""The chat web app: one page, streamed answers with citations, a live knowledge panel, thumbs up/down.

It talks to kfresh only over gRPC, through `kfresh.client.AsyncKfreshClient` (a bearer token and TLS when
the settings say so):
- POST /api/ask {"question"}: the Answer stream as server-sent events (delta, done, error);
- GET /api/knowledge: the Watch stream as server-sent events, one `change` per document version made
  searchable (the SSE id is the change's seq, so a reconnecting browser resumes where it stopped);
- POST /api/feedback {"answer_id", "vote": "up"|"down"}: stored with the answer (feedback.py);
- GET /api/status: whether kfresh answers, and what it holds.
Every failure the page can meet (an empty question, a 100 kB paste, kfresh down or refusing the token) is a
sentence for a person, never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from feedback import FeedbackStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kfresh.client import AsyncKfreshClient, tls_credentials
from kfresh.core.time import format_iso, from_timestamp
from kfresh.v1 import kfresh_pb2 as pb

log = logging.getLogger("kfresh.chatbot")
STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Settings:
    """How the web app reaches kfresh, and its limits."""

    kfresh_addr: str = "127.0.0.1:50051"
    token: str | None = None  # sent as `authorization: Bearer ...` when kfresh requires one
    tls_ca_file: Path | None = None  # TLS on, verifying kfresh's certificate against this CA
    tls_server_name: str | None = None
    feedback_db: Path = field(default_factory=lambda: Path(".kfresh/chatbot/feedback.db"))
    max_question_chars: int = 2000
    answer_timeout_s: float = 120.0


def sse(event: str, data: Mapping[str, Any], *, id: int | None = None) -> str:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def explain(exc: grpc.aio.AioRpcError, addr: str) -> str:
    """What a person should read when a kfresh call fails."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"The knowledge server ({addr}) is not reachable right now. Is kfresh running? Try again in a moment."
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "The answer took too long. Try again, or ask a shorter question."
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "The knowledge server is busy right now. Try again in a few seconds."
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return f"The knowledge server refused this chat's credentials ({code.name}): {details}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"The knowledge server could not take this question: {details}"
    return f"The knowledge server answered {code.name}: {details}"


def _when(ts: Any) -> str:
    return format_iso(from_timestamp(ts)) if ts.seconds or ts.nanos else ""


def citation_json(c: pb.Citation) -> dict[str, Any]:
    return {"index": c.index, "doc_id": c.doc_id, "version": c.version, "source": c.source,
            "valid_from": _when(c.valid_from), "score": round(c.score, 3), "text": c.text, "primary": c.primary}  # fmt: skip


def change_json(c: pb.Change) -> dict[str, Any]:
    return {"seq": c.seq, "id": c.id, "version": c.version, "op": c.op, "source": c.source,
            "title": c.metadata.get("title", ""), "lag_ms": round(c.lag_ms, 1), "acked_at": _when(c.acked_at),
            "searchable_at_ms": c.searchable_at.ToMilliseconds()}  # fmt: skip


def create_app(settings: Settings) -> Starlette:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        credentials = tls_credentials(ca_file=settings.tls_ca_file) if settings.tls_ca_file is not None else None
        client = AsyncKfreshClient(
            settings.kfresh_addr, token=settings.token, credentials=credentials, server_name=settings.tls_server_name
        )
        state["client"], state["feedback"] = client, FeedbackStore(settings.feedback_db)
        try:
            yield
        finally:
            await client.close()
            state["feedback"].close()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def ask(request: Request) -> Response:
        try:
            body = await request.json()
            question = str(body.get("question") or "").strip() if isinstance(body, dict) else ""
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": 'Send JSON like {"question": "..."}.'}, status_code=400)
        if not question:
            return JSONResponse({"error": "Type a question first."}, status_code=400)
        if len(question) > settings.max_question_chars:
            return JSONResponse(
                {"error": f"That message is {len(question):,} characters long; the limit is "
                          f"{settings.max_question_chars:,}. Ask something shorter."},
                status_code=413,
            )  # fmt: skip
        answer_id = uuid.uuid4().hex[:16]
        return StreamingResponse(_answer(question, answer_id), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _answer(question: str, answer_id: str) -> AsyncIterator[str]:
        client: AsyncKfreshClient = state["client"]
        parts: list[str] = []
        yield sse("start", {"answer_id": answer_id})
        try:
            async for event in client.answer(question, timeout=settings.answer_timeout_s):
                if event.HasField("done"):
                    d = event.done
                    done = {"answer_id": answer_id, "citations": [citation_json(c) for c in d.citations],
                            "superseded": [citation_json(c) for c in d.superseded],
                            "not_found": d.finish_reason == "not_found", "model": d.model, "adapter": d.adapter,
                            "ttft_ms": round(d.timings.time_to_first_token_ms, 1),
                            "total_ms": round(d.timings.total_ms, 1)}  # fmt: skip
                    await asyncio.to_thread(state["feedback"].record, answer_id, question, "".join(parts), done)
                    yield sse("done", done)
                else:
                    parts.append(event.delta)
                    yield sse("delta", {"text": event.delta})
        except grpc.aio.AioRpcError as exc:
            log.warning("answer_failed code=%s details=%s", exc.code().name, exc.details())
            yield sse("error", {"message": explain(exc, settings.kfresh_addr)})
        except Exception:
            log.exception("answer_failed")
            yield sse("error", {"message": "Something went wrong while answering; the chat server logged it."})

    async def knowledge(request: Request) -> Response:
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.isdigit() else 0
        return StreamingResponse(_changes(request, after), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _changes(request: Request, after: int) -> AsyncIterator[str]:
        client: AsyncKfreshClient = state["client"]
        yield "retry: 2000\n\n"  # how soon the browser reconnects (with Last-Event-ID) after a failure
        call = client.watch(after_seq=after)
        try:
            async for change in call:
                yield sse("change", change_json(change), id=change.seq)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                yield sse("problem", {"message": explain(exc, settings.kfresh_addr)})
        finally:
            call.cancel()

    async def feedback(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or body.get("vote") not in ("up", "down") or not body.get("answer_id"):
            return JSONResponse({"error": 'Send JSON like {"answer_id": "...", "vote": "up"}.'}, status_code=400)
        found = await asyncio.to_thread(state["feedback"].vote, str(body["answer_id"]), body["vote"])
        if not found:
            return JSONResponse({"error": "That answer is unknown (or older than this chat server)."}, status_code=404)
        return JSONResponse({"ok": True})

    async def status(request: Request) -> Response:
        client: AsyncKfreshClient = state["client"]
        try:
            stats = await client.stats(timeout=5)
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"reachable": False, "message": explain(exc, settings.kfresh_addr)})
        return JSONResponse({"reachable": True, "documents": stats.documents, "model": stats.model,
                             "model_ready": stats.model_ready, "adapter": stats.adapter})  # fmt: skip

    routes = [
        Route("/", index),
        Route("/api/ask", ask, methods=["POST"]),
        Route("/api/knowledge", knowledge),
        Route("/api/feedback", feedback, methods=["POST"]),
        Route("/api/status", status),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
