"""One place that maps domain errors to gRPC status codes; clients never see a traceback."""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from kfresh.errors import InvalidInput, KfreshError, NotFound, Overloaded, Unavailable

log = logging.getLogger("kfresh.server")

STATUS_OF: dict[type[KfreshError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
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
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never leaked
                await _abort(context, exc, name)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, name)

    return unary_wrapper
