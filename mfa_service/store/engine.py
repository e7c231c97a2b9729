"""The engine, and the SQL that differs between SQLite and PostgreSQL.

Here: the engine options (asyncpg statement caches and names behind PgBouncer, SQLite's
``BEGIN IMMEDIATE`` and busy timeout), the dialect-specific statements (``INSERT … ON
CONFLICT``, the user-lock upsert, the phone budget, the per-IP count of unknown device
tokens, advisory locks, ``NOTIFY``) and the mapping of driver errors to store errors.

Not here, because they are about how a transaction runs or when a process migrates, not
about SQL text:

- ``store/database.py``: on SQLite writing transactions queue on an in-process lock and
  read-only ones are marked so that their ``BEGIN`` (below) is deferred; on PostgreSQL
  reads autocommit (except behind PgBouncer); SQLite's busy timeout running out becomes
  DEADLINE_EXCEEDED;
- ``store/unit.py``: PostgreSQL sends a request's deferred writes as one ``WITH``
  statement, SQLite one by one;
- ``store/security.py``: caches the lock statements built here per dialect;
- ``store/models.py``: partial unique indexes spelled for both, ``BigID`` an INTEGER on
  SQLite; ``store/outbox.py``: ``FOR UPDATE SKIP LOCKED`` (SQLite ignores it: its write
  lock already excludes other claimants); ``migrations/env.py``: batch mode on SQLite;
- ``app.py``, ``workers.py``, ``cli_admin.py`` and ``loadtest/seed.py``: the embedded
  SQLite default migrates itself at start-up, PostgreSQL refuses an outdated schema; only
  PostgreSQL gets the CheckSession cache and its ``LISTEN`` (``app.py``); seed writes with
  COPY on PostgreSQL, executemany on SQLite.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime
from typing import Any, Protocol

from asyncpg.exceptions import TargetServerAttributeNotMatched
from sqlalchemy import Executable, Select, Table, TextClause, case, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    DBAPIError,
    EmulatedDBAPIException,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from mfa_service import deadline
from mfa_service.errors import StoreConflict, StoreError, StoreUnavailable
from mfa_service.store.models import device_misses, phone_budget_days, user_lockouts

# SQLSTATEs that mean "another transaction won, try again" (PostgreSQL appendix A).
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
# read_only_sql_transaction: the server reached is (no longer) the primary, e.g. a
# connection that outlived a switchover. The primary is elsewhere: UNAVAILABLE, retry.
_NOT_PRIMARY_SQLSTATES = {"25006"}


def database_url(url: str, password: str | None) -> URL:
    parsed = make_url(url)
    if password is not None:
        parsed = parsed.set(password=password)
    return parsed


AUTOVACUUM_OFF = (
    "PostgreSQL's autovacuum is off: nothing refreshes this database's statistics but an "
    "ANALYZE you run yourself. The service's statements are prepared once per connection, "
    "and PostgreSQL keeps the plan it made for them until the tables they read are analysed "
    "again: planned while a table was small (a new database), a lookup by key stays a "
    "sequential scan as the table grows. Turn autovacuum on, or ANALYZE the service's "
    "tables regularly (docs/OPERATIONS.md, \"Statistics\")")


async def statistics_warning(engine: AsyncEngine) -> str | None:
    """What to tell the operator when PostgreSQL will not refresh our tables' statistics
    by itself (``autovacuum = off``; a table's own ``autovacuum_enabled`` does not override
    it); None when it will. Measured on a box with autovacuum off: login spent three times
    the database CPU it needs, scanning the challenges table that had been analysed
    empty (docs/BENCHMARKS.md)."""
    async with engine.connect() as conn:
        setting = (await conn.execute(text("SHOW autovacuum"))).scalar()
    return None if setting == "on" else AUTOVACUUM_OFF


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def create_engine(url: URL, *, pool_size: int = 5, timeout: float = 5.0,
                  echo: bool = False, pooler: str = "none") -> AsyncEngine:
    """An async engine tuned per dialect.

    ``pooler="pgbouncer"``: PgBouncer in transaction pooling mode hands each transaction
    to whichever server connection is free, and 1.18 keeps no prepared statements for
    us. asyncpg's statement cache and SQLAlchemy's prepared-statement cache are off (a
    cached statement would be looked up on a server that never prepared it), and every
    statement gets a unique name (two clients' ``__asyncpg_stmt_1__`` would collide on
    one server connection). Reads then run in a transaction too (store/database.py).
    Directly connected, both caches stay on: they save a parse per statement.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(
            url, echo=echo, hide_parameters=True, connect_args={"timeout": timeout * 6})
        _make_sqlite_transactions_immediate(engine, busy_ms=int(timeout * 6 * 1000))
        return engine
    connect_args: dict[str, Any] = {
        "timeout": timeout, "command_timeout": timeout * 6,
        "server_settings": {"application_name": "mfa-service"}}
    if pooler == "pgbouncer":
        connect_args.update(statement_cache_size=0, prepared_statement_cache_size=0,
                            prepared_statement_name_func=_unique_statement_name)
    # hide_parameters: SQLAlchemy puts bound parameters into exception messages, and ours
    # include hashes and ciphertexts; nothing of that may reach a log line.
    return create_async_engine(
        url, echo=echo, hide_parameters=True,
        # Small pools: on 2 cores 64 connections were slower than 16 (docs/BENCHMARKS.md).
        # A fixed pool, no overflow: an overflow connection is closed when it is returned,
        # so under load every request above pool_size paid a new connection (TCP, auth,
        # and the driver's prepared statements lost with it); the profile showed it.
        pool_size=pool_size, max_overflow=0, pool_timeout=timeout,
        # No pool_pre_ping: it costs three round trips (BEGIN; ";"; ROLLBACK) at every
        # checkout. A connection that died is found by the statement that uses it: the
        # driver error becomes StoreUnavailable (UNAVAILABLE, retryable), the pool drops
        # the connection, and the health probe flips NOT_SERVING until the database answers.
        connect_args=connect_args,
    )


def _make_sqlite_transactions_immediate(engine: AsyncEngine, *, busy_ms: int) -> None:
    """Start every SQLite transaction with BEGIN IMMEDIATE.

    The driver's default is a deferred BEGIN: a transaction that reads and then writes
    must upgrade its lock, and when another connection writes meanwhile SQLite fails
    with SQLITE_BUSY at once, without waiting on busy_timeout. Taking the write lock up
    front makes concurrent transactions queue instead (the SQLAlchemy pysqlite recipe).

    That wait (for another process's write lock: workers, `keys rotate`) happens inside
    SQLite, in aiosqlite's thread, where no task cancellation reaches: the caller's
    deadline bounds it through ``busy_timeout`` (``busy_ms`` without a deadline). SQLite
    then gives up by itself; Database.transaction reports DeadlineExceeded.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Read-only transactions (Database.transaction(readonly=True)) take no write lock.
        readonly = conn.get_execution_options().get("mfa_readonly", False)
        if not readonly:
            due = deadline.current()
            # A little before the deadline, so SQLite gives up before the task would be
            # cancelled (a cancelled task waits for the thread all the same).
            wait_ms = busy_ms if due is None else max(1, min(busy_ms, int(
                (due - asyncio.get_running_loop().time()) * 1000) - 10))
            if conn.info.get("mfa_busy_ms") != wait_ms:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {wait_ms}")
                conn.info["mfa_busy_ms"] = wait_ms
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Executes(Protocol):
    """What the helpers below run statements through: a store Unit (store/unit.py)."""

    @property
    def dialect(self) -> str: ...

    async def execute(self, statement: Executable,
                      params: dict[str, Any] | None = None) -> Any: ...


def insert_ignore(dialect: str, table: Table, values: dict[str, Any]) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING in ``dialect``."""
    if dialect == "postgresql":
        return pg_insert(table).values(**values).on_conflict_do_nothing()
    return sqlite_insert(table).values(**values).on_conflict_do_nothing()


def upsert_lock(dialect: str, source: Select[Any]) -> Insert:
    """INSERT the ``user_lockouts`` row(s) that ``source`` selects (user_id,
    consecutive_failures, admin_reset_required), or lock the existing one, returning it.

    ``ON CONFLICT DO UPDATE`` adding one to ``lock_version`` (models.UserLockoutRow), so an
    existing row is returned too and (PostgreSQL) row-locked until the transaction ends;
    SQLite's BEGIN IMMEDIATE already holds the write lock. ``source`` must have a WHERE
    clause (SQLite's parser needs one between INSERT ... SELECT and ON CONFLICT).
    """
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(user_lockouts).from_select(
        ["user_id", "consecutive_failures", "admin_reset_required"], source)
    return stmt.on_conflict_do_update(
        index_elements=[user_lockouts.c.user_id],
        set_={"lock_version": user_lockouts.c.lock_version + 1}).returning(*user_lockouts.c)


def take_budget_unit(dialect: str, day: date, budget: int) -> Insert:
    """``INSERT`` the day's ``phone_budget_days`` row with 1 used, or add 1 to it while
    fewer than ``budget`` are used; RETURNING ``used`` (no row: the budget is spent)."""
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(phone_budget_days).values(day=day, used=1)
    return stmt.on_conflict_do_update(
        index_elements=[phone_budget_days.c.day],
        set_={"used": phone_budget_days.c.used + 1},
        where=phone_budget_days.c.used < budget,
    ).returning(phone_budget_days.c.used)


def count_device_miss(dialect: str, ip_key: bytes, now: datetime,
                      window_since: datetime) -> Insert:
    """``INSERT`` the address's ``device_misses`` row with 1 miss, or add 1 to it; a row
    whose window began at or before ``window_since`` starts a new window at ``now``."""
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(device_misses).values(ip_key=ip_key, misses=1, window_started_at=now)
    current = device_misses.c.window_started_at > window_since
    return stmt.on_conflict_do_update(
        index_elements=[device_misses.c.ip_key],
        set_={"misses": case((current, device_misses.c.misses + 1), else_=1),
              "window_started_at": case((current, device_misses.c.window_started_at),
                                        else_=stmt.excluded.window_started_at)})


async def lock_keys(unit: Executes, keys: tuple[bytes, ...]) -> None:
    """Serialise transactions on arbitrary keys until this transaction ends, taken in
    the order given, in one statement (one round trip).

    PostgreSQL: transaction-scoped advisory locks on each key's first 8 bytes (a hash, so
    collisions only make two unrelated keys wait for each other). SQLite: nothing to do,
    BEGIN IMMEDIATE already serialises every writing transaction. Every caller must list
    its kinds of key in one order (destination, number range, country): two transactions
    then never wait for each other in a cycle.
    """
    if unit.dialect != "postgresql":
        return
    statement = _ADVISORY_LOCKS.get(len(keys))
    if statement is None:
        # PostgreSQL evaluates a target list left to right: the locks come in order.
        statement = _ADVISORY_LOCKS[len(keys)] = text("SELECT " + ", ".join(
            f"pg_advisory_xact_lock(:k{i})" for i in range(len(keys))))
    await unit.execute(statement, {f"k{i}": int.from_bytes(k[:8], "big", signed=True)
                                   for i, k in enumerate(keys)})


_ADVISORY_LOCKS: dict[int, TextClause] = {}
_NOTIFY = text("SELECT pg_notify('mfa_session_revoked', :user_id)")
# The payload that means every user (a user id is never empty): the caches empty at once.
EVERY_USER = ""


async def notify_revoked(unit: Executes, user_ids: set[str]) -> None:
    """Tell every server process that these users' sessions were revoked (PostgreSQL
    NOTIFY: delivered when, and only if, the transaction commits). Their session caches
    evict the users (service/session_cache.py). SQLite has no NOTIFY and no cache."""
    if unit.dialect != "postgresql":
        return
    for user_id in sorted(user_ids):
        await unit.execute(_NOTIFY, {"user_id": user_id})


async def notify_every_user(unit: Executes) -> None:
    """Tell every server process that every session was revoked (PostgreSQL only)."""
    if unit.dialect == "postgresql":
        await unit.execute(_NOTIFY, {"user_id": EVERY_USER})


def connection_lost(exc: BaseException) -> bool:
    """Whether a raw asyncpg error (store/hot.py) means the connection is gone."""
    import asyncpg

    # InternalClientError: the protocol is stuck mid-state, as when the server's
    # "terminating connection" arrived but the closed socket was not seen yet (a
    # statement sent then cannot start): the connection is as good as gone.
    return isinstance(exc, asyncpg.exceptions.InterfaceError | asyncpg.PostgresConnectionError
                      | asyncpg.InternalClientError | OSError | ConnectionError)


def _no_primary(orig: BaseException | None) -> bool:
    """asyncpg reached every host of a multi-host URL and none accepts writes
    (``target_session_attrs=read-write``: only standbys answer, mid-failover). The driver
    calls it an internal client error; for callers it is a database that is not there."""
    return orig is not None and isinstance(orig.__cause__, TargetServerAttributeNotMatched)


def translate(exc: BaseException) -> StoreError | None:
    """Map a driver or SQLAlchemy error to a store error (None: not a store error)."""
    if isinstance(exc, EmulatedDBAPIException) and exc.orig is not None:
        # SQLAlchemy's asyncpg adapter used directly (store/hot.py: starting a
        # transaction) wraps the driver's error without SQLAlchemy's own wrapper.
        return translate(exc.orig)
    if connection_lost(exc):  # raw asyncpg (store/hot.py)
        return StoreUnavailable()
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):  # raw asyncpg, by SQLSTATE as below
        sqlstate = exc.sqlstate
        if sqlstate in _RETRYABLE_SQLSTATES:
            return StoreConflict()
        if sqlstate in _NOT_PRIMARY_SQLSTATES or (
                sqlstate is not None and sqlstate[:2] in ("08", "53", "57")):
            return StoreUnavailable()
        return None
    if isinstance(exc, IntegrityError):
        return StoreConflict()
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if sqlstate in _RETRYABLE_SQLSTATES:
            return StoreConflict()
        if sqlstate in _NOT_PRIMARY_SQLSTATES or _no_primary(exc.orig):
            return StoreUnavailable()
        if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
            if "locked" in str(exc.orig):  # SQLite: busy_timeout ran out
                return StoreConflict("the database is busy, retry")
            return StoreUnavailable()
        if sqlstate is not None and sqlstate[:2] in ("08", "53", "57"):
            # connection exception / insufficient resources / operator intervention
            return StoreUnavailable()
        return None
    if isinstance(exc, OSError | TimeoutError):  # asyncpg connect failures surface raw
        return StoreUnavailable()
    return None
