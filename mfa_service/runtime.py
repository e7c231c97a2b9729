"""A running server and its background work: ``App`` (what a built server owns, and the
orderly stop), the database health probe, the periodic purge, and ``start_background``,
which app.create_server calls once the server listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from grpc import aio
from grpc_health.v1 import health, health_pb2
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service import telemetry
from mfa_service.clock import Clock
from mfa_service.delivery.dispatcher import Dispatcher
from mfa_service.delivery.senders import Sender
from mfa_service.errors import StoreError
from mfa_service.service.session_cache import RevocationListener
from mfa_service.settings import Settings
from mfa_service.store.database import Database
from mfa_service.store.retention import Retention, purge
from mfa_service.transport.gate import CallGate

log = logging.getLogger("mfa_service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TwoFactorService"].full_name
# Health: how long the ping that confirms a call's StoreUnavailable may take, and how often
# the database is probed while it is away.
CONFIRM_SECONDS = 0.5
UNHEALTHY_PROBE_SECONDS = 0.5
# Shutdown: how long after the stop began the held calls are answered (transport/gate.py).
RELEASE_AFTER_STOP_SECONDS = 0.05


@dataclass
class App:
    """A built server and what it owns; ``stop`` releases everything."""

    server: aio.Server
    port: int
    database: Database
    health: health.aio.HealthServicer
    settings: Settings
    dispatcher: Dispatcher
    senders: list[Sender]
    gate: CallGate = field(default_factory=CallGate)
    # The plaintext health-only listener (MFA_HEALTH_LISTEN_ADDR), if any.
    health_server: aio.Server | None = None
    health_port: int | None = None
    revocations: RevocationListener | None = None
    telemetry: telemetry.Telemetry = field(default_factory=telemetry.Telemetry)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a call found the database unavailable: the probe looks at once.
    _recheck: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """Stop serving, losing no call that was received (transport/gate.py).

        Health turns NOT_SERVING at once and every call is still served for ``drain``
        seconds (load balancers and clients move away). Then new calls are held, the
        calls already running get up to ``grace`` seconds, the server stops taking calls
        and only then are the held ones answered UNAVAILABLE. Background work finishes
        its current pass (a task cancelled inside a SQLite transaction could leave the
        file's write lock held by a connection still closing in its thread); the outbox
        dispatcher finishes the messages it claimed.
        """
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        drain = self.settings.shutdown_drain_seconds if drain is None else drain
        loop = asyncio.get_running_loop()
        await self.health.enter_graceful_shutdown()  # NOT_SERVING; later sets are ignored
        if drain > 0:
            await asyncio.sleep(drain)
        end = loop.time() + grace
        self.gate.close()
        self._stopping.set()
        self.dispatcher.stop()
        if self.revocations is not None:
            self.revocations.stop()
        settled = await self.gate.settle(end)
        stopping = asyncio.create_task(self.server.stop(max(0.0, end - loop.time())))
        # The held calls are answered once the stop has begun (GOAWAY on its way): a
        # client's next attempt then cannot land in this server's queue.
        await asyncio.sleep(RELEASE_AFTER_STOP_SECONDS)
        self.gate.release()
        await stopping
        log.info("stopped serving", extra={
            "drain_seconds": drain, "grace_seconds": grace, "settled": settled,
            "calls_answered_unavailable": self.gate.held})
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=max(end - loop.time(), 2.0))
            except TimeoutError:
                log.warning("background task did not stop in time", extra={
                    "task": task.get_name()})
            except asyncio.CancelledError:  # pragma: no cover - cancelled elsewhere
                pass
        if self.health_server is not None:
            await self.health_server.stop(0)
        for sender in self.senders:
            await sender.aclose()
        await self.telemetry.shutdown()  # flush the last spans and metrics
        # Calls cut off by the grace period may leave a connection closing in its thread;
        # never let that hold the process up.
        try:
            await asyncio.wait_for(self.database.dispose(), timeout=5)
        except TimeoutError:
            log.warning("database pool did not close within 5 s")

    def store_unavailable(self) -> None:
        """A call found the database unavailable: the probe confirms and flips health."""
        self._recheck.set()


async def _set_health(app: App, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    log.warning("database health changed", extra={"serving": serving})
    for name in ("", SERVICE_NAME):
        await app.health.set(name, status)


async def _database_answers(app: App, within: float) -> bool:
    try:
        await asyncio.wait_for(app.database.ping(), timeout=within)
    except (StoreError, TimeoutError):
        return False
    return True


async def _probe_database(app: App, interval: float) -> None:
    """Health follows the database: NOT_SERVING while it does not answer.

    Every ``interval`` seconds, and at once when a call found the database unavailable:
    then one ping bounded by CONFIRM_SECONDS decides (a single dead pooled connection
    after a database restart does not take the server out; a database that is gone, or
    does not answer within that time, does). While NOT_SERVING it looks every
    UNHEALTHY_PROBE_SECONDS at most, so SERVING returns soon after the database.
    """
    serving = True
    timeout = app.settings.database_timeout_seconds
    while not app._stopping.is_set():
        wait = interval if serving else min(interval, UNHEALTHY_PROBE_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(app._stopping, app._recheck), timeout=wait)
        if app._stopping.is_set():
            return
        if app._recheck.is_set():
            app._recheck.clear()
            timeout = CONFIRM_SECONDS
        ok = await _database_answers(app, timeout)
        timeout = app.settings.database_timeout_seconds
        if ok != serving:
            serving = ok
            await _set_health(app, ok)


async def _first(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _purge_periodically(app: App, clock: Clock, interval: float) -> None:
    """Retention: ended sessions, closed challenges, sent messages and the other ended
    rows are deleted after their keep period (store/retention.py)."""
    while not app._stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app._stopping.wait(), timeout=interval)
        if app._stopping.is_set():
            return
        try:
            total: dict[str, int] = {}
            while True:
                async with app.database.transaction() as tx:
                    counts = await purge(tx, clock.now(), Retention())
                for key, value in counts.items():
                    total[key] = total.get(key, 0) + value
                if not any(counts.values()) or app._stopping.is_set():
                    break
            if any(total.values()):
                log.info("purged ended rows", extra=total)
        except StoreError:
            log.warning("purge skipped: database unavailable")


def start_background(app: App, clock: Clock) -> None:
    """The loops a serving process runs until ``App.stop``: the database health probe,
    the revocation listener (CheckSession's cache), the outbox dispatcher and the purge."""
    settings = app.settings
    app._tasks.append(asyncio.create_task(
        _probe_database(app, settings.health_probe_seconds), name="db-health-probe"))
    if app.revocations is not None:
        app._tasks.append(asyncio.create_task(app.revocations.run(),
                                              name="session-revocations"))
    if settings.outbox_dispatcher:
        app._tasks.append(asyncio.create_task(app.dispatcher.run(), name="outbox-dispatcher"))
    if settings.purge_interval_seconds > 0:
        app._tasks.append(asyncio.create_task(
            _purge_periodically(app, clock, settings.purge_interval_seconds), name="purge"))
