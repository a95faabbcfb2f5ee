"""One place that maps domain errors to gRPC status codes; clients never see a traceback."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kfresh.core import metrics
from kfresh.core.errors import (
    Cancelled,
    Forbidden,
    InvalidInput,
    KfreshError,
    NotFound,
    Overloaded,
    StorageFull,
    Unavailable,
)

log = logging.getLogger("kfresh.server")

STATUS_OF: dict[type[KfreshError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,  # disk full: gRPC's own example of this code
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Cancelled: grpc.StatusCode.CANCELLED,
}


def status_for(exc: KfreshError) -> grpc.StatusCode:
    for kind, code in STATUS_OF.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, KfreshError):
        code = status_for(exc)
        log.info("rpc_error method=%s code=%s detail=%s", method, code.name, exc)
        await context.abort(code, str(exc))
    log.exception("rpc_internal_error method=%s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server log")


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method (unary or streaming) so domain errors become the right status."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start, code = time.perf_counter(), "OK"
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit, asyncio.CancelledError):
                code = _context_code(context)
                raise
            except Exception as exc:
                code = _code_name(exc)
                await _abort(context, exc, name)
            finally:
                _observe(name, start, code)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        start, code = time.perf_counter(), "OK"
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            code = _context_code(context)
            raise
        except Exception as exc:
            code = _code_name(exc)
            await _abort(context, exc, name)
        finally:
            _observe(name, start, code)

    return unary_wrapper


def _code_name(exc: BaseException) -> str:
    return status_for(exc).name if isinstance(exc, KfreshError) else "INTERNAL"


def _context_code(context: grpc.aio.ServicerContext) -> str:
    """The status an abort set, else CANCELLED (the client went away or the server is stopping)."""
    try:
        code = context.code()
    except Exception:
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"


def _observe(method: str, start: float, code: str) -> None:
    metrics.RPC_DURATION.labels(method=method).observe(time.perf_counter() - start)
    metrics.RPC_TOTAL.labels(method=method, code=code).inc()


class _Undecodable:
    """Stands in for a request message that failed to parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, type_name: str, exc: Exception) -> None:
        self.message = f"request is not a valid {type_name} message: {exc}"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "protobuf")

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _Undecodable(type_name, exc)

    return decode


def _guard_behavior(behavior: Callable[..., Any], request_streaming: bool) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        position = 0
        async for request in requests:
            position += 1
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"message #{position}: {request.message}")
            yield request

    async def first(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request_streaming:
            return checked(request, context)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in behavior(await first(request, context), context):
                yield item

        return stream_behavior

    async def behavior_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await first(request, context), context)

    return behavior_call


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request type (corrupt wire format, invalid UTF-8 in a string)
    become INVALID_ARGUMENT; grpc.aio itself would answer UNKNOWN with the parser's exception."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behavior = getattr(handler, kind)
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(
            _guard_behavior(behavior, handler.request_streaming),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
