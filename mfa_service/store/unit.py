"""What repositories execute through: one connection in one transaction, plus the writes
that may wait until the transaction ends.

Round trips are what a request pays for on PostgreSQL (shared/BASELINES.md: the Python side
of each statement costs several times the database's work). Many writes of a request are
never read back inside it: the audit rows, the new session, the new challenge and its outbox
message, the TOTP step of the factor once the user's lock is held. Those are *deferred*:
kept here and sent together just before COMMIT. On PostgreSQL they go as one statement (a
``WITH`` of data-modifying CTEs, all on one snapshot; constraints are checked at its end);
SQLite, embedded, runs them one by one. Any immediate statement first sends what is
deferred, so a read inside the transaction always sees the transaction's own writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Executable, Select, Table, insert, literal_column, select
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase


class Unit:
    """A transaction's connection and its deferred writes."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._postgres = conn.dialect.name == "postgresql"
        self._statements: list[UpdateBase] = []
        self._inserts: dict[Table, list[dict[str, Any]]] = {}

    async def execute(self, statement: Executable,
                      params: dict[str, Any] | None = None) -> Result[Any]:
        """Run ``statement`` now (after sending the deferred writes) and return its result."""
        await self.flush()
        return await self.conn.execute(statement, params)

    async def write(self, statement: Executable,
                    params: dict[str, Any] | None = None) -> int:
        """Run a write now; its row count."""
        result = await self.execute(statement, params)
        assert isinstance(result, CursorResult)
        return result.rowcount

    def defer(self, statement: UpdateBase) -> None:
        """Send ``statement`` (an UPDATE whose row count nobody needs) before COMMIT."""
        self._statements.append(statement)

    def insert_later(self, table: Table, row: dict[str, Any]) -> None:
        """Insert ``row`` before COMMIT (rows of one table go as one multi-row INSERT, in
        the order tables were first used: parents before the children that refer to them)."""
        self._inserts.setdefault(table, []).append(row)

    async def flush(self) -> None:
        """Send every deferred write: one statement on PostgreSQL, one per write on SQLite."""
        if not self._statements and not self._inserts:
            return
        writes: list[UpdateBase] = [*self._statements, *(
            insert(table).values(rows) for table, rows in self._inserts.items())]
        self._statements, self._inserts = [], {}
        if self._postgres and len(writes) > 1:
            combined: Select[Any] = select(literal_column("1"))
            for i, write in enumerate(writes):
                combined = combined.add_cte(write.cte(f"w{i}"))
            await self.conn.execute(combined)
            return
        for write in writes:
            await self.conn.execute(write)
