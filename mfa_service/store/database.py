"""The unit of work: one transaction, the repositories that share it, and error translation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mfa_service import deadline
from mfa_service.errors import DeadlineExceeded, MfaError, StoreConflict, StoreUnavailable
from mfa_service.store import hot
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
                 autocommit: bool = False, optimistic: bool = False) -> None:
        super().__init__(conn, autocommit=autocommit, optimistic=optimistic)
        self._database = database
        self._after_commit: list[Callable[[], None]] = []
        self._events: list[tuple[str, str, Mapping[str, Any] | None]] = []

    def _on_lost(self) -> None:
        self._database.connections_lost()

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


async def _ready_to_commit(tx: Transaction, due: float | None,
                           bound: asyncio.Timeout) -> None:
    """The deferred writes sent; then, unless the caller's deadline has passed (roll
    back: DeadlineExceeded), the deadline lifted: a COMMIT is never cut short."""
    await tx.flush()
    if due is not None:
        if asyncio.get_running_loop().time() >= due:
            raise DeadlineExceeded()
        bound.reschedule(None)


async def _commit_optimistic(tx: Transaction, due: float | None,
                             bound: asyncio.Timeout) -> None:
    """An optimistic unit's writes: their one statement is its own COMMIT, so it is never
    cut short either (its outcome would be unknown): the deadline is checked before it is
    sent (past it: DeadlineExceeded, nothing written), then lifted."""
    if due is not None:
        if asyncio.get_running_loop().time() >= due:
            raise DeadlineExceeded()
        bound.reschedule(None)
    await tx.finish()


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
        # PostgreSQL: connections kept checked out of SQLAlchemy's pool between
        # transactions (``_connection``), most recent last; dropped after a lost
        # connection (``connections_lost``). At most a third of the pool, so the health
        # probe (and anything else on the engine) finds connections there.
        self._kept: list[AsyncConnection] = []
        self._keep = self._autocommit_reads
        size = getattr(engine.pool, "size", None)  # a QueuePool's configured size
        self._keep_max = max(1, size() // 3) if callable(size) else 0
        self._stale = False
        if self._keep:
            event.listen(engine.sync_engine, "handle_error", self._on_error)
        # Called after a transaction that queued a message commits (the dispatcher's wake).
        self.outbox_listeners: list[Callable[[], None]] = []
        # Called when a transaction found the database unavailable (health, at once).
        self.unavailable_listeners: list[Callable[[], None]] = []
        # Called with the security events of a transaction that committed (metrics).
        self.event_listeners: list[
            Callable[[Sequence[tuple[str, str, Mapping[str, Any] | None]]], None]] = []

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False,
                          optimistic: bool = False) -> AsyncIterator[Transaction]:
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

        ``optimistic``: try without the user's lock (store/unit.py, Unit): a read, then
        the writes as one statement that is its own transaction; NeedsLock or GuardLost
        when the caller must run again under the lock (service/optimism.py). Only on
        PostgreSQL on a direct connection, as autocommit reads; elsewhere an ordinary
        transaction.

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
            async with bound, lock, self._connection(keep=self._keep) as conn:
                if readonly and self._autocommit_reads:
                    tx = Transaction(conn, self, autocommit=True)
                    yield tx
                    await tx.flush()
                elif optimistic and self._keep:
                    tx = Transaction(conn, self, optimistic=True)
                    yield tx
                    await _commit_optimistic(tx, due, bound)
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
                    await _ready_to_commit(tx, due, bound)
                    await tx.commit_raw()
                    if conn.in_transaction():
                        await conn.commit()
                else:
                    if readonly:  # a deferred BEGIN (store/engine.py): no write lock
                        await conn.execution_options(mfa_readonly=True)
                    async with conn.begin():
                        tx = Transaction(conn, self)
                        yield tx
                        await _ready_to_commit(tx, due, bound)
                        if tx.postgres:
                            await tx.commit_raw()
        except MfaError:
            raise
        except Exception as exc:
            mapped = self._mapped(exc, bound, due, loop)
            if mapped is None:
                raise
            raise mapped from exc
        for callback in tx._after_commit:
            callback()

    def _mapped(self, exc: Exception, bound: asyncio.Timeout, due: float | None,
                loop: asyncio.AbstractEventLoop) -> MfaError | None:
        """What a failed transaction (or hot read) raises instead of ``exc``: the caller's
        deadline, a store error (the unavailable listeners told), or None: ``exc`` itself."""
        if bound.expired():
            return DeadlineExceeded()
        mapped = translate(exc)
        if mapped is None:
            return None
        if (isinstance(mapped, StoreConflict) and self._sqlite and due is not None
                and loop.time() >= due - SQLITE_BUSY_SLACK):
            # SQLite's busy_timeout, set from the deadline (store/engine.py), ran out.
            return DeadlineExceeded()
        if isinstance(mapped, StoreUnavailable):
            for listener in self.unavailable_listeners:
                listener()
        return mapped

    @cached_property
    def hot_sessions(self) -> hot.SessionReads | None:
        """CheckSession's statements through ``read_hot``, or None where it may not be
        used: only PostgreSQL on a direct connection runs reads in autocommit on kept
        connections (behind PgBouncer a read runs in a transaction; SQLite has its own
        way: ``transaction(readonly=True)``)."""
        return hot.SessionReads(self.read_hot) if self._keep else None

    async def read_hot(self, sql: str, *args: Any) -> Any:
        """One hot statement (store/hot.py) that is atomic on its own, in autocommit, on
        a kept connection: what ``transaction(readonly=True)`` around one
        ``Unit.fetchrow`` does, without the unit of work around it. The same deadline
        (checked first, then bounding the checkout and the statement), the same errors,
        the same connection kept for the next call, or dropped when its state is unsure.

        Why: CheckSession's read cost 113 µs of CPU through ``transaction`` against 67
        µs here, measured one after another on this project's benchmark box, the
        statement's own round trip included (docs/BENCHMARKS.md). Only where
        ``hot_sessions`` is not None."""
        due = deadline.current()
        loop = asyncio.get_running_loop()
        if due is not None and loop.time() >= due:
            raise DeadlineExceeded()
        if self._stale:
            await self._drop_kept()
        conn = self._kept.pop() if self._kept else None
        bound = asyncio.timeout_at(due)
        try:
            async with bound:
                if conn is None:
                    conn = self.engine.connect()
                    await conn.start()
                sync = conn.sync_connection
                assert sync is not None
                for observe in hot.observers:
                    observe(id(sync), sql)
                driver: Any = sync.connection.driver_connection
                try:
                    row = await driver.fetchrow(sql, *args)
                except BaseException as exc:
                    # As after a hot statement in a unit (Unit.fetchrow), and here, inside
                    # the deadline, where its cut shows as a cancellation: lost or cut
                    # short, the connection is not used again. (What failed is what
                    # the caller hears, not a failure to drop it.)
                    with contextlib.suppress(Exception):
                        await Transaction(conn, self, autocommit=True)._drop_if_unsure(exc)
                    raise
        except BaseException as exc:
            if conn is not None:  # back to the pool (or dropped, if invalidated above)
                with contextlib.suppress(Exception):
                    await conn.close()
            if isinstance(exc, MfaError) or not isinstance(exc, Exception):
                raise
            mapped = self._mapped(exc, bound, due, loop)
            if mapped is None:
                raise
            raise mapped from exc
        # A statement in autocommit leaves the connection as it found it: keep it (if
        # there is room, _room_to_keep).
        if self._stale or not self._room_to_keep():
            await conn.close()
        else:
            self._kept.append(conn)
        return row

    def _room_to_keep(self) -> bool:
        """Whether a connection done with may be kept: fewer than ``_keep_max`` kept, and
        not every connection of the pool out. When all are out a call may be waiting at
        the pool, and a kept connection would pass it by, taken again and again by
        later calls; returned, the waiter gets it, first come first served. (Cold
        CheckSession's p99 swings between 2x and 5x the bare server's from run to run on
        this project's benchmark box, with this rule and without: docs/BENCHMARKS.md.)"""
        pool: Any = self.engine.pool
        return len(self._kept) < self._keep_max and pool.checkedout() < pool.size()

    @asynccontextmanager
    async def _connection(self, *, keep: bool) -> AsyncIterator[AsyncConnection]:
        """A connection for one transaction: one an earlier transaction left, if any,
        else a checkout from SQLAlchemy's pool. ``keep`` (PostgreSQL without a pooler in
        between): left for the next transaction afterwards.

        Why: SQLAlchemy's checkout and return cost two greenlet switches and the pool's
        bookkeeping, 39 µs of CPU per transaction measured on this project's benchmark
        box, more than the 23 µs of CheckSession's own round trip. Reads and writers
        both keep theirs and take kept ones first (when only reads kept theirs and
        writers did not take them, three of ten connections sat kept after a
        CheckSession load and the logins after it ran at 386 and 332 pairs/s against
        546 and 473).

        A connection is kept only in the state a fresh checkout has: not closed or
        invalidated, no transaction open on the server or in SQLAlchemy (a writer's has
        committed), its isolation level never switched (a read that ran a SQLAlchemy
        statement set AUTOCOMMIT: the pool's reset undoes it). After an exception it
        goes back to the pool, whose reset on return rolls back whatever the exception
        left open. Kept connections are dropped when a connection was lost
        (``connections_lost``), as the pool replaces its own.
        """
        if self._stale:
            await self._drop_kept()
        if self._kept:
            conn = self._kept.pop()
        else:
            conn = self.engine.connect()
            await conn.start()
        kept = False
        try:
            yield conn
            kept = keep and self._room_to_keep() and self._keepable(conn)
        finally:
            if kept:
                self._kept.append(conn)
            else:
                await conn.close()

    def _keepable(self, conn: AsyncConnection) -> bool:
        if self._stale or conn.closed or conn.invalidated:
            return False
        sync = conn.sync_connection
        assert sync is not None
        # An isolation level set on this checkout (a read that ran a SQLAlchemy
        # statement): only the pool's reset on return undoes it.
        if conn.in_transaction() or "isolation_level" in sync.get_execution_options():
            return False
        adapted: Any = sync.connection.dbapi_connection
        return adapted is not None and adapted._transaction is None

    def connections_lost(self) -> None:
        """A connection was found gone (failover, restart): the kept ones are dropped
        before the next transaction, as the pool replaces its own."""
        self._stale = True

    def _on_error(self, context: Any) -> None:
        # SQLAlchemy saw a statement fail; on a disconnect it replaces its pool.
        if context.is_disconnect:
            self._stale = True

    async def _drop_kept(self) -> None:
        self._stale = False
        kept, self._kept = self._kept, []
        for conn in kept:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

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
        kept, self._kept = self._kept, []
        for conn in kept:
            with contextlib.suppress(Exception):  # a dead one: the pool drops it
                await conn.close()
        await self.engine.dispose()
