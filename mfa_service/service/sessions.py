"""2FA sessions: opened by a LOGIN verification (or, without a code, on a remembered
browser: service/devices.py), honoured by every application.

Tokens are 256 random bits (NIST SP 800-63B 7.1: at least 64) and only their HMAC is
stored, so a database dump yields no usable session. Absolute and idle lifetimes follow
NIST AAL2 (12 h / 30 min); CheckSession slides the idle deadline, never past the absolute one.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime, timedelta

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring, new_token
from mfa_service.domain import (
    Application,
    AuditContext,
    Channel,
    Factor,
    FactorRecord,
    ForgetScope,
    NewSession,
    RevokeScope,
    Session,
    TrustedDevice,
)
from mfa_service.service import audit, devices
from mfa_service.service.policy import Evidence
from mfa_service.service.session_cache import SessionCache
from mfa_service.store.database import Database, Transaction

IDLE_STEP = timedelta(minutes=1)


def _token_message(token: str) -> bytes:
    return b"mfa-service/v1/session/" + token.encode()


def token_hash(keyring: Keyring, token: str) -> tuple[str, bytes]:
    """(key id, HMAC) of a session token under the primary key: what a session row stores."""
    return keyring.mac(_token_message(token))


class SessionService:
    def __init__(self, db: Database, keyring: Keyring, clock: Clock, *,
                 ttl: timedelta, idle: timedelta, cache: SessionCache | None = None) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock
        self._ttl = ttl
        self._idle = idle
        # (Not `cache or ...`: an empty cache has len() 0 and is falsy.)
        self._cache = cache if cache is not None else SessionCache(0)

    def open(self, tx: Transaction, record: FactorRecord, application: Application,
             who: AuditContext, now: datetime, *, channel: Channel | None = None) -> NewSession:
        """Create a session inside the caller's transaction (the one approving the login);
        its row is written with the transaction's deferred writes, before COMMIT.
        ``channel``: how the code reached the user (CheckSession's amr tells SMS from a
        call)."""
        expires = now + self._ttl
        return self._open(tx, who, now, Session(
            session_id=str(uuid.uuid4()), user_id=record.factor.user_id,
            factor_id=record.factor.factor_id, method=record.factor.method,
            application=application, authenticated_at=now, expires_at=expires,
            idle_expires_at=min(now + self._idle, expires),
            channel=channel if channel is not Channel.NONE else None))

    def open_trusted(self, tx: Transaction, device: TrustedDevice, application: Application,
                     who: AuditContext, now: datetime) -> NewSession:
        """A session for a remembered browser that RecognizeDevice recognised: no code was
        typed, so ``authenticated_at`` is when a code last was (the browser was
        remembered), and ``device_id`` marks it (never fresh, never proof: ``evidence``)."""
        expires = now + self._ttl
        return self._open(tx, who, now, Session(
            session_id=str(uuid.uuid4()), user_id=device.user_id,
            factor_id=device.factor_id, method=device.method, application=application,
            authenticated_at=device.created_at, expires_at=expires,
            idle_expires_at=min(now + self._idle, expires), device_id=device.device_id))

    def _open(self, tx: Transaction, who: AuditContext, now: datetime,
              session: Session) -> NewSession:
        token = new_token()
        key_id, digest = token_hash(self._keyring, token)
        tx.later.sessions.add(session, digest, key_id, who.caller)
        detail: dict[str, str | int] | None = (
            {"device_id": session.device_id} if session.device_id is not None else None)
        audit.record(tx, now, audit.Event.SESSION_CREATED, audit.Outcome.OK, who,
                     user_id=session.user_id, factor_id=session.factor_id,
                     session_id=session.session_id, application=session.application,
                     detail=detail)
        return NewSession(session=session, token=token)

    async def check(self, token: str) -> Session | None:
        """The live session for ``token`` (its idle deadline extended), or None.

        CheckSession is the hottest call (every page of both applications). Most checks
        only read: the idle deadline is written when it would move by more than
        IDLE_STEP, so it slides in steps of at most a minute instead of costing a write
        and a WAL flush on every call. On PostgreSQL a session found in the cache with
        its slide due is slid without being read first (one round trip, not two).
        """
        now = self._clock.now()
        hashes = self._keyring.mac_all(_token_message(token))
        key, cache = hashes[0], self._cache
        cached = cache.get(key)
        if cached is not None and self._holds(cached, now):
            return cached  # service/session_cache.py: revocations evict at once
        stamp = cache.stamp()
        reads = self._db.hot_sessions
        if reads is not None:
            # PostgreSQL on a direct connection: each statement on its own, in autocommit,
            # without a unit of work around it (Database.read_hot).
            if cached is not None and self._live(cached, now):
                # Cached and due for a slide (an active user, once a minute): the slide
                # alone, without reading first. It decides liveness in the database
                # itself, so a revocation whose eviction was missed still answers None.
                session = await reads.touch_live(hashes, now, now + self._idle)
            else:
                session = await reads.find_live(hashes, now)
                if session is not None and not self._holds(session, now):
                    session = await reads.touch_live(hashes, now, now + self._idle)
            self._remember(key, session, stamp)
            return session
        # SQLite, or behind PgBouncer (neither has the cache: nothing is cached here).
        async with self._db.transaction(readonly=True) as tx:
            session = await tx.sessions.find_live(hashes, now)
            slide = session is not None and not self._holds(session, now)
            if slide and tx.postgres:
                # Behind PgBouncer: inside the read's transaction, one round trip more.
                session = await tx.sessions.touch_live(hashes, now, now + self._idle)
                slide = False
        if slide:
            # SQLite: its read transaction takes no write lock, so the write is a
            # transaction of its own.
            async with self._db.transaction() as tx:
                session = await tx.sessions.touch_live(hashes, now, now + self._idle)
        self._remember(key, session, stamp)
        return session

    def _remember(self, key: bytes, session: Session | None, stamp: int) -> None:
        if session is None:
            self._cache.discard(key)
        else:
            self._cache.put(key, session, stamp)

    @staticmethod
    def _live(session: Session, now: datetime) -> bool:
        """Inside both deadlines (as this copy of the session says)."""
        return now < session.expires_at and now < session.idle_expires_at

    def _holds(self, session: Session, now: datetime) -> bool:
        """Still live, and its idle deadline needs no slide (it would move <= a minute)."""
        if not self._live(session, now):
            return False
        wanted = min(now + self._idle, session.expires_at)
        return wanted - session.idle_expires_at <= IDLE_STEP

    async def evidence(self, tx: Transaction, token: str, user_id: str, now: datetime,
                       fresh_for: timedelta) -> tuple[frozenset[Evidence], Session | None]:
        """What ``token`` proves for ``user_id`` in the proof model (service/policy.py):
        nothing (missing, unknown, revoked, expired or another user's session: all look
        the same to the caller), a session, or a fresh one (passed 2FA at most
        ``fresh_for`` ago); and the session itself when it counts."""
        if not token:
            return frozenset(), None
        session = await tx.sessions.find_live(
            self._keyring.mac_all(_token_message(token)), now)
        if session is None or session.user_id != user_id:
            return frozenset(), None
        if session.device_id is not None:
            # Opened by a remembered browser without a code: however recent, it is not
            # the user stepping up.
            return frozenset({Evidence.TRUSTED_DEVICE_SESSION}), session
        if now - session.authenticated_at > fresh_for:
            return frozenset({Evidence.SESSION}), session
        return frozenset({Evidence.SESSION, Evidence.FRESH_SESSION}), session

    @staticmethod
    async def is_live(tx: Transaction, session_id: str, now: datetime) -> bool:
        """Whether the session ``session_id`` still lives (not revoked, not expired)."""
        return await tx.sessions.live_by_id(session_id, now)

    async def end_for_factor(self, tx: Transaction, factor: Factor, who: AuditContext,
                             now: datetime) -> int:
        """End the sessions a factor created, in the transaction that disables or replaces
        it (OWASP session management: a removed factor vouches for nothing)."""
        ended = await tx.sessions.revoke_factor(factor.user_id, factor.factor_id, now)
        await self._audit_revoked(tx, ended, who, now, RevokeScope.FACTOR_REMOVED)
        self._evict(tx, ended)
        return len(ended)

    async def end_for_devices(self, tx: Transaction, user_id: str, device_ids: list[str],
                              who: AuditContext, now: datetime) -> int:
        """End the sessions remembered browsers opened, in the transaction that forgets
        them (service/devices.py: a session stands on its browser's trust)."""
        ended = await tx.sessions.revoke_devices(user_id, device_ids, now)
        await self._audit_revoked(tx, ended, who, now, RevokeScope.DEVICE_FORGOTTEN)
        self._evict(tx, ended)
        return len(ended)

    async def revoke_token(self, token: str, who: AuditContext) -> int:
        who.authorize_any()
        now = self._clock.now()
        async with self._db.transaction() as tx:
            ended = await tx.sessions.revoke_by_hash(
                self._keyring.mac_all(_token_message(token)), now)
            await self._audit_revoked(tx, ended, who, now, RevokeScope.LOGOUT)
            self._evict(tx, ended)
        return len(ended)

    async def revoke_user(self, user_id: str, who: AuditContext, *,
                          keep_token: str = "") -> int:
        """Log the user out everywhere (else: ``keep_token``'s session stays, the one the
        user is changing their factors in)."""
        who.authorize_any()  # logging a user out everywhere is not for an audit reader
        now = self._clock.now()
        keep = self._keyring.mac_all(_token_message(keep_token)) if keep_token else []
        async with self._db.transaction() as tx:
            # The user's lock first, as every call that forgets remembered browsers.
            await tx.lockouts.lock(user_id)
            ended = await tx.sessions.revoke_user(user_id, now, keep_hashes=keep)
            await self._audit_revoked(tx, ended, who, now, RevokeScope.ALL_OTHER_SESSIONS
                                      if keep_token else RevokeScope.ALL_SESSIONS)
            self._evict(tx, ended)
            # Log out everywhere: no browser may log back in without a code either.
            await devices.forget(tx, self, user_id, who, now, ForgetScope.ALL_SESSIONS)
        return len(ended)

    def _evict(self, tx: Transaction, ended: list[Session]) -> None:
        """Drop the ended sessions' users from this process's cache now and again when the
        revocation commits (a check in between reads the database and may cache the
        session once more); other processes hear of it by NOTIFY (SessionRepository)."""
        for user_id in {s.user_id for s in ended}:
            self._cache.evict_user(user_id)
            tx.after_commit(functools.partial(self._cache.evict_user, user_id))

    @staticmethod
    async def _audit_revoked(tx: Transaction, ended: list[Session], who: AuditContext,
                             now: datetime, scope: RevokeScope) -> None:
        # The row says what the *caller* was (its name, and its application when it has
        # exactly one); where the session had been created goes in the detail.
        for s in ended:
            audit.record(tx, now, audit.Event.SESSION_REVOKED, audit.Outcome.OK, who,
                               user_id=s.user_id, factor_id=s.factor_id,
                               session_id=s.session_id, application=who.sole_application,
                               detail={"scope": scope.value,
                                       "session_application": s.application.value})
