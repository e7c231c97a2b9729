"""Several server processes on one port (MFA_WORKERS > 1).

One Python process uses one core (docs/BENCHMARKS.md). With SO_REUSEPORT the kernel
spreads *connections* (not calls) over the workers, so clients should open several
connections (docs/BENCHMARKS.md, "Baselines"). The parent prepares what the workers would race on
(the SQLite migration, the development key file), starts the workers, forwards SIGTERM /
SIGINT to them, and, if one dies, stops the others and exits non-zero so the supervisor
(systemd, Kubernetes) restarts the whole set.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from mfa_service.settings import Settings

log = logging.getLogger("mfa_service")


def _worker(index: int) -> None:
    """Entry of a spawned worker: same settings (from the same environment), own loop."""
    from mfa_service import serving
    from mfa_service.logs import configure_logging

    os.environ["MFA_WORKER_INDEX"] = str(index)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    serving.run(settings)


async def _prepare(settings: Settings) -> None:
    from mfa_service.app import load_keyring
    from mfa_service.store import migrate, open_database

    if settings.keyring is None:
        load_keyring(settings)  # create the development key file once, not N times
    if settings.is_sqlite:
        engine = open_database(settings).engine
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()


def run_workers(settings: Settings) -> int:
    """Start ``settings.workers`` server processes and supervise them."""
    asyncio.run(_prepare(settings))
    context = multiprocessing.get_context("spawn")  # no inherited event loop or gRPC state
    procs: list[BaseProcess] = [
        context.Process(target=_worker, args=(i,), name=f"mfa-worker-{i}")
        for i in range(settings.workers)]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.start()
    log.info("workers started", extra={"workers": settings.workers,
                                       "pids": [p.pid for p in procs]})
    while any(p.is_alive() for p in procs):
        if not stopping and any(not p.is_alive() and p.exitcode != 0 for p in procs):
            log.error("a worker died; stopping the others", extra={
                "exit_codes": [p.exitcode for p in procs]})
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    codes = [p.exitcode or 0 for p in procs]
    return max(codes) if not stopping else (0 if all(c == 0 for c in codes) else max(codes))
