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

If the listening connection is lost, the cache is emptied and stays off until it is back:
an invalidation can never be missed silently. SQLite has no NOTIFY (and the admin CLI may
revoke from another process), so the cache is PostgreSQL only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

from mfa_service.domain import Session

log = logging.getLogger("mfa_service.session_cache")

CHANNEL = "mfa_session_revoked"


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

    The cache is enabled only while the listener is connected; a lost connection empties
    and disables it, and the listener reconnects every ``retry_seconds``.
    """

    def __init__(self, cache: SessionCache, dsn: str, *, retry_seconds: float = 1.0,
                 connect_timeout: float = 5.0) -> None:
        self._cache = cache
        self._dsn = dsn
        self._retry = retry_seconds
        self._timeout = connect_timeout
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()

    async def run(self) -> None:
        import asyncpg

        while not self._stopping.is_set():
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=self._timeout,
                    server_settings={"application_name": "mfa-service-revocations"})
                conn.add_termination_listener(lambda _c: self._lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self._lost.clear()
                self._cache.clear()
                self._cache.enabled = True
                log.info("session cache on: listening for revocations")
                stop = asyncio.ensure_future(self._stopping.wait())
                lost = asyncio.ensure_future(self._lost.wait())
                await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                lost.cancel()
            except (TimeoutError, OSError, Exception) as exc:
                log.warning("session cache off: cannot listen for revocations",
                            extra={"error": type(exc).__name__})
            finally:
                self._cache.enabled = False
                self._cache.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            if not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._retry)

    def stop(self) -> None:
        self._stopping.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._cache.evict_user(payload)
