"""The gate every unary call passes first: calls in progress, the caller's deadline, and
the last phase of a graceful shutdown.

The deadline: ``context.time_remaining()`` goes to ``mfa_service.deadline`` so the store
bounds its work by it (store/database.py).

Why calls are *held* at the end of a shutdown: grpc.aio's ``server.stop()`` ends every
call that the gRPC core has received but not yet handed to the application with
CANCELLED, and so does any call that reaches the core once the stop has begun
(48 such calls under load: docs/BENCHMARKS.md, "Baselines"). A call cannot be refused
before it reaches the application, so the gate makes sure none is waiting when the stop begins:

1. drain (``MFA_SHUTDOWN_DRAIN_SECONDS``): health says NOT_SERVING, every call is served;
   load balancers and clients move away;
2. ``close()``: each call that arrives from now on is held, unanswered; a client waiting
   for an answer sends nothing more on its connection. Calls already running go on;
3. ``settle()``: once no admitted call runs and no new one arrived for a moment (the
   core's queue is empty), the server stops: GOAWAY, the listener closes;
4. ``release()``: only then are the held calls answered UNAVAILABLE, which clients
   retry (the next attempt cannot reach this server any more).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from mfa_service import deadline
from mfa_service.errors import InvalidArgument
from mfa_service.transport.status import to_grpc_status

Handler = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]

# No new call for this long after the last one arrived: the core holds none for us.
QUIET_SECONDS = 0.1
# The store's deadline is this much earlier than the caller's, so the server ends the work
# and answers DEADLINE_EXCEEDED itself (access log, ErrorInfo) instead of racing the gRPC
# core, which cancels the call's task at the deadline.
DEADLINE_MARGIN_SECONDS = 0.05
SHUTTING_DOWN = "the server is shutting down; retry (another replica will answer)"


class _Undecodable:
    """Stands for request bytes that are not a message of the method's type."""


UNDECODABLE = _Undecodable()


def _tolerant(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that hands on UNDECODABLE instead of raising: grpc.aio answers a
    deserializer's exception with UNKNOWN and the parser's text ("String field had bad
    UTF-8"); a caller's bad bytes are INVALID_ARGUMENT like any other bad request."""
    if decode is None:
        return None

    def tolerant(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            return UNDECODABLE

    return tolerant


class CallGate:
    """Counts the calls the application runs; holds new ones once closed."""

    def __init__(self) -> None:
        self.running = 0
        self.held = 0
        self.closed = False
        self._release = asyncio.Event()
        self._last_arrival = 0.0
        self.arrivals = 0  # calls that reached the gate, held ones included

    def close(self) -> None:
        """From now on, hold every new call until ``release``."""
        self.closed = True

    def release(self) -> None:
        """Answer every held call (and any later one) UNAVAILABLE."""
        self._release.set()

    async def settle(self, until: float, *, quiet: float = QUIET_SECONDS) -> bool:
        """Wait (at most until loop time ``until``) for no running call and ``quiet``
        seconds without a new one, seen on two looks ``quiet / 2`` apart with no arrival
        between them; False if time ran out first.

        Why two looks: a loop that stalled (a busy CPU, a garbage collection) finds
        ``quiet`` seconds gone when it wakes, though calls that reached the core during the
        stall are only now being handed over; they would be cancelled by the stop. The
        second look, after the loop has turned again, lets them arrive first."""
        loop = asyncio.get_running_loop()
        seen: int | None = None  # the arrivals counted at the first quiet look
        while True:
            now = loop.time()
            calm = self.running == 0 and now - self._last_arrival >= quiet
            if calm and seen == self.arrivals:
                return True
            seen = self.arrivals if calm else None
            if now >= until:
                return False
            await asyncio.sleep(min(quiet / 2, max(until - now, 0.001)))
            for _ in range(3):  # calls handed over in this turn take their first step
                await asyncio.sleep(0)

    def wrap(self, inner: Handler) -> Handler:
        async def gated(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            now = self._last_arrival = asyncio.get_running_loop().time()
            self.arrivals += 1
            if self.closed:
                self.held += 1
                await self._release.wait()
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            if request is UNDECODABLE:
                status = to_grpc_status(InvalidArgument.single(
                    "request", "is not a valid message of this method's request type "
                               "(malformed protobuf, or a string that is not UTF-8)"))
                await context.abort(status.code, status.details, status.trailing_metadata)
            remaining = context.time_remaining()
            deadline.set_remaining(
                None if remaining is None
                else remaining - min(DEADLINE_MARGIN_SECONDS, remaining / 10), now)
            self.running += 1
            try:
                return await inner(request, context)
            finally:
                self.running -= 1

        return gated


class WrappingRegistrar:
    """What the generated ``add_*_to_server`` functions register their handlers on: every
    unary-unary handler is wrapped once, here, by the gate and then by ``around`` (the
    service's own envelope, transport/interceptors.py); streams (health Watch,
    reflection) pass untouched. Then handed to the real server.

    Not server interceptors: grpc.aio awaits every interceptor's coroutine on every call
    to find the handler, even one that returns a handler it made before. Measured on this
    project's 2-core box (a bare grpc.aio server and the same one with two interceptors
    that return cached handlers): 20-50 µs more server CPU per call, against about 190 µs
    for the bare call (docs/BENCHMARKS.md).
    """

    def __init__(self, server: aio.Server, gate: CallGate,
                 around: Callable[[str, Handler], Handler] | None = None) -> None:
        self._server = server
        self._gate = gate
        self._around = around
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        """Registered with the server as one generic handler, not by name.

        grpc.aio's serving loop keeps one pending "next call" future per method registered
        by name (and one for all generic ones) and, for every call that arrives, awaits
        ``asyncio.wait`` over all of them: each call pays for every method of every
        service. Measured on uvloop here: 13 µs per wait over 17 futures (this service's
        methods and health's), 6 µs over 2. A generic handler costs one dictionary
        lookup by method name instead (docs/BENCHMARKS.md)."""
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {name: self.wrap(f"/{service}/{name}", handler)
                      for name, handler in handlers.items()})])

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_Generic(h, self) for h in handlers])

    def wrap(self, method: str,
             handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` of ``method`` ("/package.Service/Method") wrapped, made once."""
        if handler.unary_unary is None:
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            inner = cast(Handler, handler.unary_unary)
            if self._around is not None:
                inner = self._around(method, inner)
            wrapped = self._wrapped[method] = grpc.unary_unary_rpc_method_handler(
                self._gate.wrap(inner),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return wrapped


class _Generic(grpc.GenericRpcHandler):
    """A generic handler whose answers are wrapped as the registered ones are (grpc
    looks here only for a method that is not registered by name)."""

    def __init__(self, inner: grpc.GenericRpcHandler, registrar: WrappingRegistrar) -> None:
        self._inner = inner
        self._registrar = registrar

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # unknown methods are not remembered: any name can be asked
        return self._registrar.wrap(handler_call_details.method, handler)
