"""Cross-cutting work around every TwoFactorService call.

Order on the server (outermost first): OpenTelemetry's server interceptor (a span per
RPC, only when spans are exported), the call gate (transport/gate.py), then
``around_service_calls``: caller identity into a contextvar, one access-log line per call,
and the single place where exceptions become statuses.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

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


def around_service_calls(callers: CallerRegistry | None = None,
                         metrics: Metrics | None = None) -> Callable[[str, Handler], Handler]:
    """Caller authentication, context, access log and error mapping for mfa.v1 calls: a
    function that wraps one method's handler (transport/gate.py: ``WrappingRegistrar``
    applies it once per method, at registration). Other services pass unwrapped.

    Without a registry (development on loopback only, enforced at start-up) every call is
    the anonymous development caller.
    """

    def around(method: str, inner: Handler) -> Handler:
        if not method.startswith(SERVICE_PREFIX):
            return inner
        return _wrap(method, inner, callers, metrics)

    return around


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
