"""Counting the SQL statements an in-process server sends: SQLAlchemy's cursor events and
the raw asyncpg hot path's observers (mfa_service/store/hot.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import event

from mfa_service.app import App
from mfa_service.store import hot

T = TypeVar("T")


class Statements:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []  # (connection, statement)

    @property
    def sql(self) -> list[str]:
        # The health probe's connection (it runs SELECT 1 on its own schedule) is not
        # part of any RPC: drop everything it sent (its BEGIN on SQLite too).
        probes = {c for c, statement in self.seen if statement.strip() == "SELECT 1"}
        return [statement for c, statement in self.seen if c not in probes]

    async def count(self, call: Awaitable[T]) -> tuple[T, int]:
        self.seen.clear()
        result = await call
        return result, len(self.sql)


@contextmanager
def counting(app: App) -> Iterator[Statements]:
    seen = Statements()

    def record(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.seen.append((id(conn), statement))

    def record_hot(conn: int, statement: str) -> None:  # store/hot.py: raw asyncpg
        seen.seen.append((conn, statement))

    engine = app.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    hot.observers.append(record_hot)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
        hot.observers.remove(record_hot)
