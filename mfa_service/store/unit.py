"""What repositories execute through: one connection in one transaction, plus the writes
that may wait until the transaction ends.

Round trips are what a request pays for on PostgreSQL (docs/BENCHMARKS.md, "Baselines":
the Python side of each statement costs several times the database's work). Many writes
of a request are never read back inside it: the audit rows, the new session, the new
challenge and its outbox message, the TOTP step of the factor once the user's lock is
held. Those are *deferred*: kept here and sent together just before COMMIT. On
PostgreSQL they go as one statement (a ``WITH`` of data-modifying CTEs, all on one
snapshot; constraints are checked at its end); SQLite, embedded, runs them one by one.
Any immediate statement first sends what is deferred, so a read inside the transaction
always sees the transaction's own writes.

A deferred UPDATE may be a *guard*: a conditional write whose row count is the answer (the
TOTP step only moves forward, a passkey's counter is swapped only from the value read, a
factor is touched only while ACTIVE). Its row count is read back - on PostgreSQL the
combined statement returns one count per guard - and a guard that matched no row raises
``GuardLost``: the transaction rolls back, and the use case runs again on the winner's
state. So replay safety does not rest on the per-user lock alone.

Deferred UPDATEs are statements built once (module constants with bound parameters) plus
their parameters. The combined PostgreSQL statement is built once per *shape* (which
updates, how many rows of which tables) as a text statement with typed parameters, so it
is compiled once and then found in SQLAlchemy's cache: building it from expression objects
on every call cost more CPU than the round trips it saves (a DML CTE is not cacheable).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import asyncpg
from sqlalchemy import (
    Executable,
    Table,
    TextClause,
    bindparam,
    exists,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Compiled, CursorResult
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.util.typing import TupleAny, Unpack

from mfa_service.errors import GuardLost, NeedsLock
from mfa_service.store import hot
from mfa_service.store.engine import connection_lost
from mfa_service.store.models import user_lockouts

# Compiles deferred UPDATEs to SQL with :named parameters, to be embedded in one WITH.
# No casts in that text: the asyncpg dialect adds its own to the typed parameters.
_NAMED_PG = postgresql.dialect(paramstyle="named")  # type: ignore[no-untyped-call]
_NAMED_PG.bind_typing = BindTyping.NONE


# Where one argument of a batch comes from: (update index, parameter name, None, bind
# processor) or (table index among the inserts, row index, column, bind processor).
_Source = tuple[int, Any, str | None, Callable[[Any], Any] | None]
# PostgreSQL: the batch compiled for asyncpg ($n with casts), and its arguments' sources.
_Raw = tuple[str, tuple[_Source, ...]]


@dataclass(frozen=True)
class _Batch:
    """The combined statement of one shape, and how to fill in its parameters."""

    statement: TextClause
    updates: tuple[Compiled, ...]  # each deferred UPDATE compiled, in order
    raw: _Raw | None = None  # set on first use


_BATCHES: dict[tuple[Any, ...], _Batch] = {}
_INSERTS: dict[Table, Any] = {}

# Optimistic units (``Unit(optimistic=True)``): the guard that stands for the user's lock.
# The first write of the one statement moves ``lock_version`` on from the value the read
# found, as taking the lock would have; a lock taken or a write made meanwhile moved it
# already, so nothing matches. (LockoutWrites.save carries the same condition when the
# counter itself is written: one UPDATE per row.)
USER_LOCK = "user lock"
_HELD = user_lockouts.alias("held")
# ... and it never waits for that lock: held by another call, the statement fails at once
# (lock_not_available) and the use case runs again under the lock, waiting there within
# the caller's deadline. The one statement is its own COMMIT and so runs past the
# deadline (a COMMIT is never cut short): a wait there could end after the caller was
# told DEADLINE_EXCEEDED, with the login done.
NOT_HELD = exists(select(literal(1)).select_from(_HELD).where(
    _HELD.c.user_id == bindparam("cas_uid")).with_for_update(nowait=True))


def standing_for_the_lock(statement: Any) -> Any:
    """``statement`` (an UPDATE of the user's ``user_lockouts`` row) made to stand for the
    user's lock: only if ``lock_version`` is still ``cas_seen``, moving it on, and never
    waiting for the row (NOT_HELD: ``cas_uid``)."""
    return statement.where(user_lockouts.c.lock_version == bindparam("cas_seen"),
                           NOT_HELD).values(lock_version=user_lockouts.c.lock_version + 1)


VERSION_STILL = standing_for_the_lock(
    update(user_lockouts).where(user_lockouts.c.user_id == bindparam("cas_uid")))
# Raised by mfa_guard_lost() (migrations/versions/0013_guard_lost.py); and PostgreSQL's
# lock_not_available, from NOT_HELD.
GUARD_LOST_SQLSTATE = "MFA01"
LOCK_NOT_AVAILABLE = "55P03"


class Unit:
    """A transaction's connection and its deferred writes."""

    def __init__(self, conn: AsyncConnection, *, autocommit: bool = False,
                 optimistic: bool = False) -> None:
        """``optimistic`` (PostgreSQL only): the unit reads without the user's lock and
        sends all its writes at the end as one statement in autocommit, which writes
        only if the user's ``lock_version`` is still what the read found
        (``read_version``) and every guard matched; else nothing is written and
        GuardLost is raised. Anything else - a statement through SQLAlchemy, a write
        before the end, a read after a deferred write, a read that is not one of
        ``hot.OPTIMISTIC_READS`` - raises NeedsLock before anything is written, and the
        use case runs again under the lock (service/optimism.py says where it tries).

        Why it is sound: every transaction that changes what a user's Verify or
        Challenge reads takes the user's lock first, and every lock moves
        ``lock_version`` on (store/hot.py); the one statement takes the same row lock
        first (its first CTE), so between the read and the write nothing of the user's
        can have changed unnoticed. The guards still check the rows themselves."""
        # Private: every statement goes through execute/fetchrow/flush, so nothing runs
        # past the deferred writes (a read that would miss them, a write sent before them).
        self._conn = conn
        self._optimistic = optimistic
        self._seen: tuple[str, int] | None = None  # the user and lock_version read
        autocommit = autocommit or optimistic
        # PostgreSQL, ``autocommit``: every statement on its own (store/database.py,
        # readonly). Hot statements need nothing for it (asyncpg sends them outside any
        # transaction when none is begun); SQLAlchemy's connection is switched to
        # AUTOCOMMIT only before its first statement here, a greenlet switch (about
        # 20 µs) that CheckSession's single hot read does not pay.
        self._autocommit = autocommit
        self._switched = False
        self.dialect: str = conn.dialect.name
        self._postgres = self.dialect == "postgresql"
        self.postgres = self._postgres
        self._updates: list[tuple[UpdateBase, dict[str, Any], str | None]] = []
        self._inserts: dict[Table, list[dict[str, Any]]] = {}
        self._before_flush: list[Callable[[], None]] = []
        # PostgreSQL: SQLAlchemy's asyncpg adapter and the asyncpg connection under
        # ``_conn``, looked up once per unit (``_raw``): each lookup through the async
        # engine is a greenlet switch (about 20 µs of CPU), and a login did seven.
        self._adapted: Any = None
        self._driver: Any = None

    @property
    def optimistic(self) -> bool:
        """Whether this unit reads without the user's lock (see ``__init__``)."""
        return self._optimistic

    def read_version(self, user_id: str, version: int | None) -> None:
        """Optimistic: the user whose lock the writes stand for, and the ``lock_version``
        the read found (None: the user has no counter row yet, which only a lock makes)."""
        if version is None:
            raise NeedsLock("the user has no lockout counter yet")
        if self._seen is not None and self._seen[0] != user_id:
            raise NeedsLock("a second user")
        self._seen = (user_id, version)

    def version_read(self, user_id: str) -> int | None:
        """Optimistic, for ``user_id``: the ``lock_version`` read (LockoutWrites.save
        writes the counter on that condition); else None."""
        if self._optimistic and self._seen is not None and self._seen[0] == user_id:
            return self._seen[1]
        return None

    def _needs_lock(self, why: str) -> None:
        if self._optimistic:
            raise NeedsLock(why)

    async def execute(self, statement: Executable, params: dict[str, Any] | None = None, *,
                      sees_deferred: bool = True) -> CursorResult[Unpack[TupleAny]]:
        """Run ``statement`` now and return its result; the deferred writes go first unless
        the caller knows the statement cannot depend on them (``sees_deferred=False``)."""
        self._needs_lock("a statement through SQLAlchemy")
        if sees_deferred:
            await self.flush()
        return await (await self._sqlalchemy()).execute(statement, params)

    async def _sqlalchemy(self) -> AsyncConnection:
        """The SQLAlchemy connection, switched to AUTOCOMMIT first in an autocommit unit."""
        if self._autocommit and not self._switched:
            await self._conn.execution_options(isolation_level="AUTOCOMMIT")
            self._switched = True
        return self._conn

    async def fetchrow(self, sql: str, *args: Any, sees_deferred: bool = True) -> Any:
        """PostgreSQL only: one row of a hot statement (store/hot.py), run with asyncpg on
        this unit's connection (inside its transaction, if any); deferred writes first.

        A connection that failed here is invalidated, so the pool does not hand it out
        again (SQLAlchemy did not see the failure)."""
        if self._optimistic:
            if sql not in hot.OPTIMISTIC_READS:
                raise NeedsLock("a statement that is not a read")
            if self._pending():
                raise NeedsLock("a read after a write")
        elif sees_deferred:
            await self.flush()
        return await self._fetchrow(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        adapted, driver = await self._raw()
        for observe in hot.observers:
            observe(id(self._conn.sync_connection), sql)
        try:
            if adapted._transaction is None and not self._autocommit:
                # SQLAlchemy's asyncpg adapter sends BEGIN lazily, before the first
                # statement it runs itself: a hot statement first in a transaction
                # must start it the same way, or it would run (and release its row
                # locks) on its own.
                await adapted._start_transaction()
            return await driver.fetchrow(sql, *args)
        except BaseException as exc:
            await self._drop_if_unsure(exc)
            raise

    async def commit_raw(self) -> None:
        """PostgreSQL: COMMIT on the raw asyncpg connection, past SQLAlchemy's execution
        path (the adapter then finds no transaction, and its own commit does nothing).
        BEGIN cannot ride on the first statement, nor COMMIT on the write batch: asyncpg
        has no pipelining (MagicStack/asyncpg#839), and the simple-query protocol that
        takes several statements takes no parameters. A COMMIT that fails raises here;
        the transaction has then ended on the server (as after a failed COMMIT)."""
        adapted, _ = await self._raw()
        transaction, adapted._transaction = adapted._transaction, None
        if transaction is None:
            return
        try:  # (not a statement the counts and spans see, as SQLAlchemy's COMMIT was not)
            await transaction.commit()
        except BaseException as exc:
            await self._drop_if_unsure(exc)
            raise

    async def _drop_if_unsure(self, exc: BaseException) -> None:
        """After a raw statement failed: a connection whose state is unknown never goes
        back to the pool.

        Lost (the server is gone, as after a failover): this connection and every other
        one the pool holds are replaced before they are handed out again, as SQLAlchemy
        does when it sees a disconnect. Cut short (the caller's deadline cancelled the
        statement, or the COMMIT): the server may still hold the transaction open, which
        SQLAlchemy cannot roll back for us (the adapter no longer tracks it), so the
        connection is closed and the server rolls the transaction back."""
        self._adapted = self._driver = None
        if connection_lost(exc):
            await self._conn.invalidate()
            await self._conn.engine.dispose(close=False)
            self._on_lost()
        elif isinstance(exc, asyncio.CancelledError):
            await self._conn.invalidate()

    def _on_lost(self) -> None:
        """Called once a connection was found gone (Transaction: the database drops the
        connections it keeps)."""

    async def driver(self) -> Any:
        """PostgreSQL only: the asyncpg connection under this unit, inside its transaction
        (begun as ``fetchrow`` begins it), deferred writes sent first. For bulk work
        SQLAlchemy has no statement for (COPY: store/bulk.py)."""
        self._needs_lock("bulk work")
        await self.flush()
        adapted, driver = await self._raw()
        if adapted._transaction is None and not self._autocommit:
            await adapted._start_transaction()
        return driver

    async def _raw(self) -> tuple[Any, Any]:
        """SQLAlchemy's asyncpg adapter and the asyncpg connection under this unit."""
        if self._driver is None:
            sync = self._conn.sync_connection
            if sync is not None and not sync.closed and not sync.invalidated:
                # Checked out and valid: the pool's connection is already at hand, no
                # greenlet switch needed (the async lookup below may reconnect).
                raw: Any = sync.connection
            else:
                raw = await self._conn.get_raw_connection()
            self._adapted, self._driver = raw.dbapi_connection, raw.driver_connection
        return self._adapted, self._driver

    async def execute_many(self, statement: Executable,
                           rows: Sequence[dict[str, Any]]) -> None:
        """Run ``statement`` once per row (executemany), deferred writes first."""
        self._needs_lock("a statement through SQLAlchemy")
        await self.flush()
        await (await self._sqlalchemy()).execute(statement, list(rows))

    async def write(self, statement: Executable,
                    params: dict[str, Any] | None = None) -> int:
        """Run a write now; its row count."""
        result = await self.execute(statement, params)
        assert isinstance(result, CursorResult)
        return result.rowcount

    def defer(self, statement: UpdateBase, params: dict[str, Any], *,
              guard: str | None = None) -> None:
        """Send ``statement`` (a prebuilt UPDATE) with ``params`` before COMMIT.

        ``guard``: the statement must change exactly one row, else the flush raises
        ``GuardLost(guard)`` (nobody else needs its row count).

        At most one deferred UPDATE per row: on PostgreSQL they run inside one statement,
        and a row updated twice by one statement keeps only one of the two changes
        (which one is not defined). A repository that may change one row twice merges
        the changes itself (see ``before_flush``).
        """
        self._updates.append((statement, params, guard))

    def before_flush(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the deferred writes are about to be sent (a repository
        turns its merged pending changes into ``defer`` calls there)."""
        if callback not in self._before_flush:
            self._before_flush.append(callback)

    def insert_later(self, table: Table, row: dict[str, Any]) -> None:
        """Insert ``row`` before COMMIT (rows of one table go as one multi-row INSERT, in
        the order tables were first used: parents before the children that refer to
        them). Every row of a table must name the same columns."""
        self._inserts.setdefault(table, []).append(row)

    def _pending(self) -> bool:
        return bool(self._updates or self._inserts or self._before_flush)

    async def flush(self) -> None:
        """Send every deferred write: one statement on PostgreSQL, one per table or
        update on SQLite. (Optimistic: the writes go only at the end, ``finish``; a
        flush with writes pending would send them early, so it needs the lock.)"""
        if self._optimistic:
            if self._pending():
                raise NeedsLock("writes sent before the end")
            return
        await self._flush()

    async def finish(self) -> None:
        """Optimistic: send the writes, all in one statement that is its own transaction
        (nothing to send: nothing to check either, the read alone answered)."""
        assert self._optimistic
        pending = self._take_pending()
        if pending is None:
            return
        updates, inserts = pending
        if self._seen is None:
            raise NeedsLock("writes with no lock_version read")
        # The user's lock first, as everywhere (the guard that stands for it runs first).
        locks = [u for u in updates if u[2] == USER_LOCK]
        if not locks:
            user_id, seen = self._seen
            locks = [(VERSION_STILL, {"cas_uid": user_id, "cas_seen": seen}, USER_LOCK)]
        await self._send_as_one(locks + [u for u in updates if u[2] != USER_LOCK], inserts)

    def _take_pending(self) -> tuple[list[tuple[UpdateBase, dict[str, Any], str | None]],
                                     dict[Table, list[dict[str, Any]]]] | None:
        """The deferred writes, taken (the repositories' merged changes turned into writes
        first); None when there are none."""
        callbacks, self._before_flush = self._before_flush, []
        for callback in callbacks:
            callback()
        updates, inserts = self._updates, self._inserts
        if not updates and not inserts:
            return None
        self._updates, self._inserts = [], {}
        return updates, inserts

    async def _flush(self) -> None:
        pending = self._take_pending()
        if pending is None:
            return
        updates, inserts = pending
        if self._postgres and len(updates) + len(inserts) > 1:
            await self._send_as_one(updates, inserts)
            return
        for statement, params, guard in updates:
            result = await (await self._sqlalchemy()).execute(statement, params)
            assert isinstance(result, CursorResult)
            if guard is not None and result.rowcount != 1:
                raise GuardLost(guard)
        for table, rows in inserts.items():
            if table not in _INSERTS:
                _INSERTS[table] = insert(table)
            await (await self._sqlalchemy()).execute(_INSERTS[table], rows)

    async def _send_as_one(self,
                           updates: Sequence[tuple[UpdateBase, dict[str, Any], str | None]],
                           inserts: dict[Table, list[dict[str, Any]]]) -> None:
        shape = (tuple((id(statement), guard is not None) for statement, _, guard in updates),
                 tuple((table.name, len(rows), tuple(rows[0])) for table, rows in
                       inserts.items()), self._optimistic)
        batch = _BATCHES.get(shape)
        if batch is None:
            batch = _BATCHES[shape] = _build_batch(updates, inserts,
                                                   undo_if_lost=self._optimistic)
        # On the raw asyncpg connection, as the hot statements (store/hot.py): the batch is
        # sent once or twice per request, and SQLAlchemy's path around asyncpg cost more
        # CPU than the statement itself.
        raw = batch.raw or self._compile_raw(shape, batch)
        sql, sources = raw
        # Each UPDATE's parameters with its constants filled in; then every argument
        # straight from where the plan says it is (no renamed copy of them all).
        given = [compiled.construct_params(params) or {} for (_, params, _), compiled in
                 zip(updates, batch.updates, strict=True)]
        tables = list(inserts.values())
        args = []
        for where, key, column, process in sources:
            value = given[where][key] if column is None else tables[where][key][column]
            args.append(value if process is None else process(value))
        guarded = [g for _, _, g in updates if g is not None]
        try:
            counts = tuple(await self._fetchrow(sql, *args))
        except asyncpg.PostgresError as exc:
            # Optimistic: the statement undid itself (mfa_guard_lost, the guard's index),
            # or found the user's lock held (NOT_HELD).
            if self._optimistic and exc.sqlstate == LOCK_NOT_AVAILABLE:
                raise GuardLost(USER_LOCK) from None
            if exc.sqlstate != GUARD_LOST_SQLSTATE:
                raise
            lost = re.search(r"guarded write (\d+) ", str(exc))
            raise GuardLost(guarded[int(lost.group(1))] if lost else USER_LOCK) from None
        for guard, count in zip(guarded, counts, strict=False):
            if count != 1:
                raise GuardLost(guard)


    def _compile_raw(self, shape: tuple[Any, ...], batch: _Batch) -> _Raw:
        """The batch for asyncpg: compiled once with the connection's dialect (numbered
        parameters, each with the cast SQLAlchemy renders for its type), and for each
        parameter in order where its value is found (``_Source``) with the bind processor
        of its type (aware datetimes to the naive UTC stored)."""
        compiled = batch.statement.compile(dialect=self._conn.dialect)
        updates = len(shape[0])
        sources: list[_Source] = []
        for name in compiled.positiontup or ():
            # Named by _build_batch: "w{i}_{name}" (the i-th UPDATE's parameter) or
            # "w{n}_{r}_{column}" (row r of the n-th table's INSERT, after the updates).
            index, rest = name[1:].split("_", 1)
            # SQLAlchemy's own table of processors per parameter (pinned < 2.2, pyproject).
            process = _single(compiled._bind_processors.get(name))
            if int(index) < updates:
                sources.append((int(index), rest, None, process))
            else:
                row, column = rest.split("_", 1)
                sources.append((int(index) - updates, int(row), column, process))
        raw = (str(compiled), tuple(sources))
        _BATCHES[shape] = replace(batch, raw=raw)
        return raw


def _single(processor: object) -> Callable[[Any], Any] | None:
    """A bind processor of one value (a deferred write has no tuple-typed parameter)."""
    if processor is None:
        return None
    if not callable(processor):  # pragma: no cover - a tuple type's per-item processors
        raise TypeError("a deferred write has a tuple-typed parameter")
    return cast(Callable[[Any], Any], processor)


def _build_batch(updates: Sequence[tuple[UpdateBase, dict[str, Any], str | None]],
                 inserts: dict[Table, list[dict[str, Any]]], *,
                 undo_if_lost: bool = False) -> _Batch:
    """The combined statement. ``undo_if_lost`` (an optimistic unit, where the statement
    is its own transaction): a guard that matched no row makes the statement fail, so
    nothing it wrote stands. Its last part looks at the guards in order (the user's lock
    first: store/unit.py, USER_LOCK); each is run when first looked at, so the user's row
    is locked before any other, the order every transaction takes them in."""
    parts: list[str] = []
    binds = []
    compiled_updates = []
    counted: list[str] = []
    for i, (statement, _, guard) in enumerate(updates):
        compiled = statement.compile(dialect=_NAMED_PG)
        compiled_updates.append(compiled)
        sql = str(compiled)
        for bind, name in compiled.bind_names.items():  # name: as rendered in ``sql``
            sql = re.sub(rf":{re.escape(name)}\b", f":w{i}_{name}", sql)
            binds.append(bindparam(f"w{i}_{name}", type_=bind.type))
        if guard is not None:
            # A data-modifying CTE's rows are visible to the outer SELECT only through
            # RETURNING: the count of a guard's rows is its answer.
            sql += " RETURNING 1"
            counted.append(f"(SELECT count(*) FROM w{i})")  # noqa: S608 - an index, no input
        parts.append(f"w{i} AS ({sql})")
    offset = len(updates)
    for k, (table, rows) in enumerate(inserts.items()):
        n = offset + k
        columns = list(rows[0])
        values = ", ".join("(" + ", ".join(f":w{n}_{r}_{c}" for c in columns) + ")"
                           for r in range(len(rows)))
        # Names from our own table metadata, values as bound parameters: no input here.
        parts.append(f"w{n} AS (INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608
                     f"VALUES {values})")
        binds.extend(bindparam(f"w{n}_{r}_{c}", type_=table.c[c].type)
                     for r in range(len(rows)) for c in columns)
    # Names from our own metadata: no input in the text.
    tail = " SELECT " + (", ".join(counted) if counted else "1")
    if undo_if_lost and counted:
        tail = (" SELECT CASE " + " ".join(f"WHEN {count} <> 1 THEN mfa_guard_lost({k})"
                                           for k, count in enumerate(counted))
                + " ELSE 1 END")
    combined = text("WITH " + ", ".join(parts) + tail).bindparams(*binds)
    return _Batch(combined, tuple(compiled_updates))
