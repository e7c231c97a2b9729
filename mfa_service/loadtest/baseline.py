"""``--baseline``: the transport ceiling of this machine, measured in the same run.

A bare ``grpc.aio`` server in a process of its own (``python -m
mfa_service.loadtest.baseline``), on loopback, serving one generic unary handler at
``/mfa.v1.TwoFactorService/CheckSession`` that ignores the request bytes and answers a
constant ``CheckSessionResponse(valid=true)``: no database, no interceptors, no protobuf
parsing on the server. The load generator drives it with the very stubs, channels and
concurrency of the real run (the ``echo`` scenario is check-session's call with a random
token), so "0.6x baseline" reads as "what the service costs over gRPC itself", the way
the baselines of docs/BENCHMARKS.md compare servers. It runs on uvloop when available, as
``serve`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.loadtest.config import LoadTestError

SERVICE = "mfa.v1.TwoFactorService"
METHOD = "CheckSession"
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0
READY = "baseline-port"  # the child prints "baseline-port <port>" once it listens

_ANSWER = pb.CheckSessionResponse(valid=True).SerializeToString()


async def _check_session(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    return _ANSWER


async def serve_echo(host: str = "127.0.0.1") -> None:
    """Serve until SIGTERM/SIGINT or until stdin closes (the parent went away)."""
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        # No (de)serializers: the handler sees and returns raw bytes.
        METHOD: grpc.unary_unary_rpc_method_handler(_check_session),
    })
    # so_reuseport off: a stray server on the same port must fail, not share it.
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    print(f"{READY} {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    await stop.wait()
    await server.stop(0)


@asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """Start the bare server in a child process; yields its ``127.0.0.1:PORT``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mfa_service.loadtest.baseline",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            line = b""
        word, _, port = line.decode().strip().partition(" ")
        if word != READY or not port.isdigit():
            raise LoadTestError("the baseline server did not start "
                                f"(exit status {proc.returncode})")
        yield f"127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


def main() -> None:
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # as `mfa-service serve` does

        run = uvloop.run
    run(serve_echo())


if __name__ == "__main__":
    main()
