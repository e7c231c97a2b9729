"""The unit of work: one transaction, the repositories that share it, and error translation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mfa_service import deadline
from mfa_service.errors import DeadlineExceeded, MfaError, StoreConflict, StoreUnavailable
from mfa_service.store.devices import DeviceRepository, DeviceWrites
from mfa_service.store.engine import translate
from mfa_service.store.outbox import OutboxRepository, OutboxWrites
from mfa_service.store.repositories import (
    AuditRepository,
    AuditWrites,
    ChallengeRepository,
    ChallengeWrites,
    FactorRepository,
    FactorWrites,
    SessionRepository,
    SessionWrites,
)
from mfa_service.store.security import (
    LockoutRepository,
    LockoutWrites,
    RecoveryCodeRepository,
    RecoveryCodeWrites,
)
from mfa_service.store.unit import Unit

# SQLite's busy handler sleeps in steps: "database is locked" this close to the deadline
# means the deadline ended the wait.
SQLITE_BUSY_SLACK = 0.05


class Later:
    """``tx.later``: the deferred writes of each aggregate (nothing reads them back in
    the transaction; they go as one statement before COMMIT on PostgreSQL)."""

    def __init__(self, unit: Unit) -> None:
        self._unit = unit

    @cached_property
    def factors(self) -> FactorWrites:
        return FactorWrites(self._unit)

    @cached_property
    def challenges(self) -> ChallengeWrites:
        return ChallengeWrites(self._unit)

    @cached_property
    def sessions(self) -> SessionWrites:
        return SessionWrites(self._unit)

    @cached_property
    def audit(self) -> AuditWrites:
        return AuditWrites(self._unit)

    @cached_property
    def outbox(self) -> OutboxWrites:
        return OutboxWrites(self._unit)

    @cached_property
    def lockouts(self) -> LockoutWrites:
        return LockoutWrites(self._unit)

    @cached_property
    def recovery(self) -> RecoveryCodeWrites:
        return RecoveryCodeWrites(self._unit)

    @cached_property
    def devices(self) -> DeviceWrites:
        return DeviceWrites(self._unit)


class Transaction(Unit):
    """The repositories of one transaction, and what to do once it has committed.

    Repositories are made on first use (most RPCs touch two or three of the eight).
    """

    def __init__(self, conn: AsyncConnection, database: Database, *,
                 autocommit: bool = False) -> None:
        super().__init__(conn, autocommit=autocommit)
        self._database = database
        self._after_commit: list[Callable[[], None]] = []
        self._events: list[tuple[str, str, Mapping[str, Any] | None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this transaction has committed (never on rollback);
        the same callback registered twice runs once."""
        if callback not in self._after_commit:
            self._after_commit.append(callback)

    def note_event(self, event: str, outcome: str, detail: Mapping[str, Any] | None,
                   application: str | None) -> None:
        """A security event this transaction records; the database's event listeners
        (metrics) get the list once the transaction committed. Nothing is kept when no
        one listens."""
        if self._database.event_listeners:
            if not self._events:
                self.after_commit(self._publish_events)
            facts = dict(detail or {})
            if application is not None:
                facts["application"] = application
            self._events.append((event, outcome, facts))

    def _publish_events(self) -> None:
        for listener in self._database.event_listeners:
            listener(self._events)

    def wake_outbox(self) -> None:
        """Tell this process's outbox dispatcher that a message is waiting (registered by
        delivery.outbox.enqueue with ``after_commit``: a message that did not commit is
        never looked for)."""
        for listener in self._database.outbox_listeners:
            listener()

    @cached_property
    def later(self) -> Later:
        """The writes that wait for COMMIT: everything reached through it is sent with
        the transaction's deferred writes (store/unit.py), nothing earlier; what is
        reached directly on the transaction runs when awaited."""
        return Later(self)

    @cached_property
    def factors(self) -> FactorRepository:
        return FactorRepository(self)

    @cached_property
    def challenges(self) -> ChallengeRepository:
        return ChallengeRepository(self)

    @cached_property
    def sessions(self) -> SessionRepository:
        return SessionRepository(self)

    @cached_property
    def audit(self) -> AuditRepository:
        return AuditRepository(self)

    @cached_property
    def outbox(self) -> OutboxRepository:
        return OutboxRepository(self)

    @cached_property
    def lockouts(self) -> LockoutRepository:
        return LockoutRepository(self)

    @cached_property
    def recovery(self) -> RecoveryCodeRepository:
        return RecoveryCodeRepository(self)

    @cached_property
    def devices(self) -> DeviceRepository:
        return DeviceRepository(self)


class Database:
    """Owns the engine; hands out transactions with driver errors mapped to store errors."""

    def __init__(self, engine: AsyncEngine, *, pooled: bool = False) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # Behind PgBouncer (transaction pooling) a statement outside a transaction may
        # be prepared on one server connection and executed on another: reads run in a
        # transaction there, which pins one server connection until COMMIT.
        self._autocommit_reads = not self._sqlite and not pooled
        self._write_lock: asyncio.Lock | None = None
        # Called after a transaction that queued a message commits (the dispatcher's wake).
        self.outbox_listeners: list[Callable[[], None]] = []
        # Called when a transaction found the database unavailable (health, at once).
        self.unavailable_listeners: list[Callable[[], None]] = []
        # Called with the security events of a transaction that committed (metrics).
        self.event_listeners: list[
            Callable[[Sequence[tuple[str, str, Mapping[str, Any] | None]]], None]] = []

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[Transaction]:
        """Commit on success, roll back on any exception; then the after-commit callbacks.

        Domain errors raised inside pass through untouched (and roll back); driver errors
        become StoreUnavailable / StoreConflict with the original as ``__cause__``.

        The caller's deadline (mfa_service.deadline) bounds everything up to COMMIT:
        waiting for the write lock or a connection, every statement (on PostgreSQL a
        statement cut short is cancelled on the server: asyncpg sends a cancel request
        and the connection is replaced) and the deferred writes. Past it the transaction
        rolls back and DeadlineExceeded is raised, so a caller told DEADLINE_EXCEEDED
        finds nothing half done. The COMMIT itself is never cut short: its outcome would
        be unknown. This costs no round trip (no ``SET statement_timeout``): one timer.

        ``readonly``: for a single statement that reads (CheckSession, ListFactors). On
        PostgreSQL the connection runs in autocommit, so the statement is the only round
        trip (no BEGIN / COMMIT); several statements would not share one snapshot, so
        keep those to one. A statement that is atomic on its own may also write
        (CheckSession's slide of a due idle deadline, on PostgreSQL only). On SQLite a
        deferred BEGIN takes no write lock, and nothing may be written.

        SQLite has one writer at a time. Its busy handler sleeps and polls, so writers
        queued on it wait unfairly (p99 over a second at 16 in flight); inside this
        process they queue on an asyncio lock instead, in order. ``readonly``
        transactions skip the lock (WAL readers never block).
        """
        due = deadline.current()
        loop = asyncio.get_running_loop()
        if due is not None and loop.time() >= due:
            raise DeadlineExceeded()
        lock: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        if self._sqlite and not readonly:
            if self._write_lock is None:
                self._write_lock = asyncio.Lock()
            lock = self._write_lock
        tx: Transaction | None = None
        bound = asyncio.timeout_at(due)
        try:
            async with bound, lock, self.engine.connect() as conn:
                if readonly and self._autocommit_reads:
                    tx = Transaction(conn, self, autocommit=True)
                    yield tx
                    await tx.flush()
                elif not self._sqlite and not readonly:
                    # PostgreSQL: no SQLAlchemy ``begin()``. Its begin and the commit on
                    # leaving it are a greenlet switch each (about 20 µs of CPU) and send
                    # nothing: the adapter begins before the first statement (a hot
                    # statement begins the same way, Unit.fetchrow), and commit_raw
                    # commits. A statement run through SQLAlchemy begins its own
                    # transaction object (autobegin) on that same database transaction,
                    # committed below once commit_raw has committed it (nothing is sent).
                    # On any exception, closing the connection rolls back: SQLAlchemy's
                    # transaction if it began one, else the pool's reset on return.
                    tx = Transaction(conn, self)
                    yield tx
                    await tx.flush()  # the deferred writes, before COMMIT
                    if due is not None:
                        if loop.time() >= due:  # the caller gave up: roll back
                            raise DeadlineExceeded()
                        bound.reschedule(None)  # never cut a COMMIT short
                    await tx.commit_raw()
                    if conn.in_transaction():
                        await conn.commit()
                else:
                    if readonly:  # a deferred BEGIN (store/engine.py): no write lock
                        await conn.execution_options(mfa_readonly=True)
                    async with conn.begin():
                        tx = Transaction(conn, self)
                        yield tx
                        await tx.flush()  # the deferred writes, before COMMIT
                        if due is not None:
                            if loop.time() >= due:  # the caller gave up: roll back
                                raise DeadlineExceeded()
                            bound.reschedule(None)  # never cut a COMMIT short
                        if tx.postgres:
                            await tx.commit_raw()
        except MfaError:
            raise
        except Exception as exc:
            if bound.expired():
                raise DeadlineExceeded() from exc
            mapped = translate(exc)
            if mapped is None:
                raise
            if (isinstance(mapped, StoreConflict) and self._sqlite and due is not None
                    and loop.time() >= due - SQLITE_BUSY_SLACK):
                # SQLite's busy_timeout, set from the deadline (store/engine.py), ran out.
                raise DeadlineExceeded() from exc
            if isinstance(mapped, StoreUnavailable):
                for listener in self.unavailable_listeners:
                    listener()
            raise mapped from exc
        for callback in tx._after_commit:
            callback()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a trivial query."""
        try:
            async with self.engine.connect() as conn:
                if self._sqlite:  # a deferred BEGIN: the probe takes no write lock
                    await conn.execution_options(mfa_readonly=True)
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def dispose(self) -> None:
        await self.engine.dispose()
