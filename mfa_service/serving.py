"""Running one server process until SIGTERM / SIGINT (used by ``serve`` and by each worker)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from mfa_service.settings import Settings

log = logging.getLogger("mfa_service")


async def serve(settings: Settings) -> None:
    from mfa_service.app import create_server

    app = await create_server(settings)
    # What start-up made lives as long as the process (modules, the schema, the pools):
    # out of the collector's sight, so a full collection does not walk it again. Here,
    # about 140,000 objects; a full collection under load took 44-74 ms before, a pause
    # every call in flight waited out (docs/BENCHMARKS.md).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"drain_seconds": settings.shutdown_drain_seconds,
                                      "grace_seconds": settings.shutdown_grace_seconds})
    await app.stop()


def run(settings: Settings) -> None:
    """Serve on uvloop when it is installed (+6-12 %, docs/BENCHMARKS.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
