"""The unit of work: one transaction, the repositories that share it, and error translation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Commit on success, roll back on any exception.

        Domain errors raised inside pass through untouched (and roll back); driver errors
        become StoreUnavailable / StoreConflict with the original as ``__cause__``.
        """
        try:
            async with self.engine.begin() as conn:
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
