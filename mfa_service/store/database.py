"""The unit of work: one transaction, the repositories that share it, and error translation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mfa_service.errors import MfaError
from mfa_service.store.engine import translate
from mfa_service.store.outbox import OutboxRepository
from mfa_service.store.repositories import (
    AuditRepository,
    ChallengeRepository,
    FactorRepository,
    SessionRepository,
)
from mfa_service.store.security import LockoutRepository, RecoveryCodeRepository


@dataclass(frozen=True)
class Transaction:
    """The repositories of one transaction."""

    conn: AsyncConnection
    factors: FactorRepository
    challenges: ChallengeRepository
    sessions: SessionRepository
    audit: AuditRepository
    outbox: OutboxRepository
    lockouts: LockoutRepository
    recovery: RecoveryCodeRepository


class Database:
    """Owns the engine; hands out transactions with driver errors mapped to store errors."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_lock: asyncio.Lock | None = None

    @asynccontextmanager
    async def transaction(self, *, readonly: bool = False) -> AsyncIterator[Transaction]:
        """Commit on success, roll back on any exception.

        Domain errors raised inside pass through untouched (and roll back); driver errors
        become StoreUnavailable / StoreConflict with the original as ``__cause__``.

        SQLite has one writer at a time. Its busy handler sleeps and polls, so writers
        queued on it wait unfairly (p99 over a second at 16 in flight); inside this
        process they queue on an asyncio lock instead, in order. ``readonly``
        transactions skip the lock and start a deferred BEGIN (WAL readers never block).
        """
        lock: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        if self._sqlite and not readonly:
            if self._write_lock is None:
                self._write_lock = asyncio.Lock()
            lock = self._write_lock
        try:
            async with lock, self.engine.connect() as conn:
                if readonly:
                    await conn.execution_options(mfa_readonly=True)
                async with conn.begin():
                    yield Transaction(conn, FactorRepository(conn), ChallengeRepository(conn),
                                      SessionRepository(conn), AuditRepository(conn),
                                      OutboxRepository(conn), LockoutRepository(conn),
                                      RecoveryCodeRepository(conn))
        except MfaError:
            raise
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers a trivial query."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def dispose(self) -> None:
        await self.engine.dispose()
