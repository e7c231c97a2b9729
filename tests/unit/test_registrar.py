"""transport/gate.py: WrappingRegistrar puts each unary handler behind the gate once, at
registration, whether grpc finds it by name or through the generic handler."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.transport.gate import QUIET_SECONDS, UNDECODABLE, CallGate, WrappingRegistrar


class _Recording:
    """Stands for aio.Server: keeps what is registered on it."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self.registered[service] = handlers

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_unary_handlers_are_wrapped_once_and_streams_pass() -> None:
    seen: list[str] = []

    async def unary(request: Any, context: Any) -> str:
        seen.append(f"inner {request}")
        return "answer"

    async def stream(request: Any, context: Any) -> Any:  # pragma: no cover - never called
        yield "x"

    def around(method: str, inner: Any) -> Any:
        async def enveloped(request: Any, context: Any) -> Any:
            seen.append(f"around {method}")
            return await inner(request, context)
        return enveloped

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Check": grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=pb.CheckSessionRequest.FromString),
        "Watch": grpc.unary_stream_rpc_method_handler(stream),
    }
    server, gate = _Recording(), CallGate()
    registrar = WrappingRegistrar(server, gate, around)  # type: ignore[arg-type]
    registrar.add_registered_method_handlers("pkg.Service", handlers)
    registrar.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("pkg.Service", handlers)])

    # Registered by name, the service reaches the server as a generic handler (see
    # add_registered_method_handlers); found through a generic handler of its own, a
    # method is the very same wrapped handler.
    assert server.registered == {}
    [by_name, generic] = server.generic
    check = by_name.service(_Details("/pkg.Service/Check"))
    assert check is not None and check is not handlers["Check"]
    assert generic.service(_Details("/pkg.Service/Check")) is check
    for found in (by_name, generic):
        assert found.service(_Details("/pkg.Service/Watch")) is handlers["Watch"]
        assert found.service(_Details("/pkg.Service/Nope")) is None

    class _Context:
        def time_remaining(self) -> None:
            return None

    assert check.unary_unary is not None
    assert asyncio.run(check.unary_unary("hi", _Context())) == "answer"  # type: ignore[arg-type]
    assert seen == ["around /pkg.Service/Check", "inner hi"]  # the gate, then around
    assert gate.running == 0  # counted while it ran, and no more
    # The deserializer hands on UNDECODABLE for bytes that are not a message, which the
    # gate answers INVALID_ARGUMENT (grpc.aio would say UNKNOWN); a message passes.
    decode = check.request_deserializer
    assert decode is not None
    assert decode(b"\xff") is UNDECODABLE
    assert decode(pb.CheckSessionRequest(session_token="t").SerializeToString()) == \
        pb.CheckSessionRequest(session_token="t")


def test_settle_waits_for_a_call_handed_over_after_a_quiet_look() -> None:
    """The gate looked quiet once (no call for QUIET_SECONDS); a call reaching it before
    the second look restarts the wait: settle returns only QUIET_SECONDS after that call,
    and only once it has finished."""

    class _Context:
        def time_remaining(self) -> None:
            return None

    async def scenario() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        gate = CallGate()
        done = asyncio.Event()

        async def slow(request: Any, context: Any) -> str:
            await done.wait()
            return "ok"

        handler = gate.wrap(slow)
        settling = asyncio.create_task(gate.settle(loop.time() + 5))
        await asyncio.sleep(0)  # settle's first look: quiet (nothing ever arrived)
        call: asyncio.Future[Any] = asyncio.ensure_future(
            handler("r", _Context()))  # type: ignore[arg-type]
        await asyncio.sleep(QUIET_SECONDS)
        assert not settling.done()  # a call runs
        finished = loop.time()
        done.set()
        await call
        assert await settling
        return finished, gate._last_arrival, loop.time()

    finished, arrived, settled = asyncio.run(scenario())
    assert settled >= arrived + QUIET_SECONDS and settled >= finished
