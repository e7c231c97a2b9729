"""A bounded in-process cache for CheckSession, invalidated at once on revocation.

CheckSession runs on every page of both applications; most checks of a session find it
as the last one did. The cache keeps what the database said about a session (keyed by the
HMAC of its token under the primary key) and answers from memory while that answer still
holds: the session is inside both deadlines and its idle deadline would move by no more
than a minute (the database is asked, and written, at most once a minute per session:
sessions.py IDLE_STEP). Everything that ends sessions early is a revocation, and every
revocation evicts:

- in this process, at once: the revoking transaction evicts the user's entries when it
  commits (and before, so a check in between reads the database);
- in every other process and replica, within a second: the revoking transaction sends a
  PostgreSQL ``NOTIFY mfa_session_revoked, '<user id>'`` (delivered only if it commits),
  and each process LISTENs on a dedicated connection and evicts that user's entries.

If the listening connection is lost, or merely stops delivering (half-open: no heartbeat
came back within 1.5 s, see RevocationListener), the cache is emptied and stays off until
the listener is back and hears its heartbeat again: a missed invalidation is served from
the cache for at most that long, not until the cached answer expires (a minute). SQLite has no
NOTIFY (and the admin CLI may revoke from another process), so the cache is PostgreSQL
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, TypeVar

from mfa_service.domain import Session
from mfa_service.store.engine import EVERY_USER

log = logging.getLogger("mfa_service.session_cache")

CHANNEL = "mfa_session_revoked"
# The listener proves its connection with a heartbeat every half second; one missed
# (none received within 1.5 s of the previous) turns the cache off, so a revocation whose
# NOTIFY is lost is served from the cache for at most about that long. The interval
# leaves a second of that for a late heartbeat: the next one is sent half a second after
# the last send returned. Every second left half a second, and on a saturated 2-core box
# (two workers, the load generator and PostgreSQL) heartbeats came late 5-7 times in a
# run against 1 with half a second, each time emptying a worker's cache
# (docs/BENCHMARKS.md). Two NOTIFYs a second per process cost the database nothing
# that shows.
HEARTBEAT_SECONDS = 0.5
MISS_SECONDS = 1.5
# Misses in a row after which a silent listening connection is replaced.
RECONNECT_AFTER = 4
# TCP keepalives on the listening connection: a backstop under the heartbeat, so the
# kernel also ends a dead connection (about 11 s of silence).
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
KEEPALIVE_USER_TIMEOUT_MS = 10_000

_T = TypeVar("_T")


class SessionCache:
    """LRU of token hash -> Session, with the user's hashes indexed for eviction."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[bytes, Session] = OrderedDict()
        self._by_user: dict[str, set[bytes]] = {}
        self._evictions = 0  # moves on every eviction: see stamp()
        self.enabled = False  # on only while the invalidation listener is connected

    def stamp(self) -> int:
        """Taken before reading a session from the database; ``put`` with an older stamp
        is ignored. Closes the race where a revocation commits (and evicts) between our
        read and our put: the stale answer would otherwise stay cached."""
        return self._evictions

    def get(self, key: bytes) -> Session | None:
        if not self.enabled:
            return None
        session = self._entries.get(key)
        if session is not None:
            self._entries.move_to_end(key)
        return session

    def put(self, key: bytes, session: Session, stamp: int) -> None:
        if not self.enabled or stamp != self._evictions or self._max <= 0:
            return
        self._entries[key] = session
        self._entries.move_to_end(key)
        self._by_user.setdefault(session.user_id, set()).add(key)
        while len(self._entries) > self._max:
            old_key, old = self._entries.popitem(last=False)
            self._forget(old.user_id, old_key)

    def discard(self, key: bytes) -> None:
        session = self._entries.pop(key, None)
        if session is not None:
            self._forget(session.user_id, key)

    def evict_user(self, user_id: str) -> None:
        self._evictions += 1
        for key in self._by_user.pop(user_id, set()):
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._evictions += 1
        self._entries.clear()
        self._by_user.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, user_id: str, key: bytes) -> None:
        keys = self._by_user.get(user_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[user_id]


class RevocationListener:
    """LISTENs for revocations on a connection of its own; keeps the cache honest.

    The cache is on only while the listener *knows* it hears every revocation. A lost
    connection says so (asyncpg's termination callback), but a half-open one (a peer
    gone without a FIN or RST: a NAT or firewall dropping state, a network partition)
    says nothing while the revocations it should carry are lost. So the listener
    proves its connection every ``heartbeat_seconds``: a NOTIFY on a channel of its own,
    sent through a second connection (a NOTIFY on the listening connection would prove
    only that it can write to itself), must come back on the listening one. PostgreSQL
    delivers notifications to a listener in commit order, so a heartbeat received also
    means every revocation committed before it was sent has been received.

    One heartbeat missed (none received within ``miss_seconds`` of the previous one)
    turns the cache off and empties it; the listener reconnects both connections every
    ``retry_seconds``, and the cache comes back, empty, with the first heartbeat heard
    on the new connection (what was cached before may have missed a revocation). TCP
    keepalives on the listening socket make the kernel end a dead connection even if
    the listener itself stalls.
    """

    def __init__(self, cache: SessionCache, dsn: str, *, retry_seconds: float = 1.0,
                 connect_timeout: float = 5.0, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 miss_seconds: float = MISS_SECONDS, heartbeat_dsn: str | None = None) -> None:
        self._cache = cache
        self._dsn = dsn
        # The heartbeat's sending connection: normally the same server; a test puts a
        # proxy in front of the listening connection only.
        self._heartbeat_dsn = heartbeat_dsn or dsn
        self._retry = retry_seconds
        self._timeout = connect_timeout
        self._interval = heartbeat_seconds
        self._miss = miss_seconds
        # Unique per listener: each process hears its own heartbeats only (one shared
        # channel would deliver every replica's heartbeat to every replica).
        self.heartbeat_channel = f"{CHANNEL}_hb_{secrets.token_hex(8)}"
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._beat = asyncio.Event()
        self._sent = 0
        self._listening: Any = None  # the listening connection, while there is one

    async def run(self) -> None:
        while not self._stopping.is_set():
            listening: Any = None
            sending: Any = None
            try:
                listening = await self._until_stopped(self._connect(self._dsn, "revocations"))
                if listening is None:
                    break
                set_keepalive(listening)
                self._listening = listening
                self._lost.clear()
                self._beat.clear()
                listening.add_termination_listener(lambda _c: self._lost.set())
                await listening.add_listener(CHANNEL, self._on_notify)
                await listening.add_listener(self.heartbeat_channel, self._on_heartbeat)
                sending = await self._until_stopped(
                    self._connect(self._heartbeat_dsn, "heartbeat"))
                if sending is None:
                    break
                await self._serve(sending)
            except (TimeoutError, OSError, Exception) as exc:
                log.warning("session cache off: cannot listen for revocations",
                            extra={"error": type(exc).__name__})
            finally:
                self._cache.enabled = False
                self._cache.clear()
                self._listening = None
                for conn in (listening, sending):
                    if conn is not None:
                        # terminate, not close: a half-open connection would not answer
                        # a Terminate message, and nothing on it needs to be said.
                        with contextlib.suppress(Exception):
                            conn.terminate()
            if not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._retry)

    async def _serve(self, sending: Any) -> None:
        """Heartbeats until one is missed, the connection is lost or the listener stops."""
        loop = asyncio.get_running_loop()
        beating = asyncio.ensure_future(self._send_heartbeats(sending))
        stop = asyncio.ensure_future(self._stopping.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            last = loop.time()  # the first heartbeat is sent now
            while True:
                beat = asyncio.ensure_future(self._beat.wait())
                # Cache on: one miss turns it off. Off: a late heartbeat on the same
                # connection turns it back on (notifications arrive in commit order, so
                # every revocation sent before it has arrived too: a busy process, not a
                # dead connection); none for RECONNECT_AFTER misses: connect anew.
                wait = self._miss if self._cache.enabled else self._miss * RECONNECT_AFTER
                done, _ = await asyncio.wait(
                    {beat, stop, lost, beating}, timeout=max(0.0, last + wait - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED)
                beat.cancel()
                if stop in done:
                    return
                if lost in done or beating in done:
                    log.warning("session cache off: revocation listener lost")
                    return
                if beat not in done:
                    if not self._cache.enabled:
                        log.warning("revocation listener silent: connecting anew")
                        return
                    self._cache.enabled = False
                    self._cache.clear()
                    log.warning("session cache off: revocation heartbeat missed",
                                extra={"miss_seconds": self._miss})
                    continue
                self._beat.clear()
                last = loop.time()
                if not self._cache.enabled:
                    # Empty: anything cached before the outage may have missed a revocation.
                    self._cache.clear()
                    self._cache.enabled = True
                    log.info("session cache on: listening for revocations")
        finally:
            for task in (beating, stop, lost):
                task.cancel()
            with contextlib.suppress(BaseException):
                await beating

    async def _send_heartbeats(self, sending: Any) -> None:
        """Every ``heartbeat_seconds`` until a send fails or takes longer than a miss."""
        while True:
            self._sent += 1
            await asyncio.wait_for(
                sending.execute("SELECT pg_notify($1, $2)", self.heartbeat_channel,
                                str(self._sent)), timeout=self._miss)
            await asyncio.sleep(self._interval)

    async def _connect(self, dsn: str, role: str) -> Any:
        import asyncpg

        return await asyncpg.connect(
            dsn, timeout=self._timeout,
            server_settings={"application_name": f"mfa-service-{role}"})

    async def _until_stopped(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """``work``'s result, or None (``work`` cancelled) if the listener stops first:
        a connection attempt to an unreachable server must not hold up the shutdown."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            conn: Any = await task
            if conn is not None:  # connected just as it was cancelled
                conn.terminate()
        return None

    def stop(self) -> None:
        self._stopping.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == EVERY_USER:  # an operator ended every session (admin end-all-sessions)
            self._cache.clear()
        else:
            self._cache.evict_user(payload)

    def _on_heartbeat(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._beat.set()


def set_keepalive(conn: Any) -> None:
    """TCP keepalives on an asyncpg connection's socket (asyncpg has no option for them,
    and ``server_settings`` only sets the server's side: MagicStack/asyncpg#606). Probes
    after KEEPALIVE_IDLE seconds of silence, every KEEPALIVE_INTERVAL, dead after
    KEEPALIVE_COUNT unanswered; TCP_USER_TIMEOUT also ends it when sent data stays
    unacknowledged that long. A Unix socket has no such thing."""
    sock = conn._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
                        ("TCP_USER_TIMEOUT", KEEPALIVE_USER_TIMEOUT_MS)):
        option = getattr(socket, name, None)  # Linux has all; macOS lacks some
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
