"""Cross-cutting work around every TwoFactorService call.

Order on the server (outermost first): OpenTelemetry's server interceptor (a span per
RPC), then ``ServiceInterceptor``: caller identity into a contextvar, one access-log line
per call, and the single place where exceptions become statuses.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from grpc import aio

from mfa_service.domain import Caller
from mfa_service.errors import MfaError
from mfa_service.telemetry import Metrics
from mfa_service.transport.auth import ANONYMOUS, NOBODY, CallerRegistry
from mfa_service.transport.status import internal_status, status_code_for, to_grpc_status

log = logging.getLogger("mfa_service.rpc")

caller_var: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=NOBODY)

SERVICE_PREFIX = "/mfa.v1."

Handler = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


class ServiceInterceptor(aio.ServerInterceptor):
    """Caller authentication, context, access log and error mapping for mfa.v1 calls.

    Without a registry (development on loopback only, enforced at start-up) every call is
    the anonymous development caller.
    """

    def __init__(self, callers: CallerRegistry | None = None,
                 metrics: Metrics | None = None) -> None:
        self._callers = callers
        self._metrics = metrics
        # The wrapped handler of each method, made once: the servicer's handlers do not
        # change, and building a handler object on every call showed in the profile.
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not method.startswith(
                SERVICE_PREFIX):
            return handler
        wrapped = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
            _wrap(method, cast(Handler, handler.unary_unary), self._callers, self._metrics),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
        return wrapped


def _wrap(method: str, inner: Handler, callers: CallerRegistry | None,
          metrics: Metrics | None = None) -> Handler:
    rpc = method.rsplit("/", 1)[-1]

    async def handle(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            # Every call says who it is; without a registry (development on loopback,
            # enforced at start-up) that is the development caller, never a default.
            caller_var.set(ANONYMOUS if callers is None else callers.authenticate(
                context.invocation_metadata() or (), context.auth_context()))
            return await inner(request, context)
        except aio.AbortError:
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except MfaError as exc:
            status = to_grpc_status(exc)
            code = status_code_for(exc)
            # context.abort (not abort_with_status) so OpenTelemetry records the code.
            await context.abort(status.code, status.details, status.trailing_metadata)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error", extra={"rpc": rpc})
            status = internal_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            elapsed = time.perf_counter() - started
            if metrics is not None:
                metrics.rpc(rpc, code, elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info("rpc", extra={
                    "rpc": rpc, "code": code.name, "caller": caller_var.get().name,
                    "duration_ms": round(elapsed * 1000, 2)})

    return handle
