"""Counting the SQL statements an in-process server sends: SQLAlchemy's cursor events and
the raw asyncpg hot path's observers (mfa_service/store/hot.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import event

from mfa_service.app import App
from mfa_service.store import hot

T = TypeVar("T")


def _task() -> int:
    """Who sent a statement: the asyncio task it ran in (one gRPC call's, the health
    probe's, the outbox dispatcher's). Not the connection: one connection serves one
    task's transaction and then the next task's (store/database.py keeps connections
    between transactions), and SQLAlchemy's greenlets run inside the calling task."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no loop running here
        task = None
    return id(task)


class Statements:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []  # (task, statement)

    @property
    def sql(self) -> list[str]:
        # The health probe (it runs SELECT 1 on its own schedule) is not part of any
        # RPC: drop everything its task sent (its BEGIN on SQLite too).
        probes = {t for t, statement in self.seen if statement.strip() == "SELECT 1"}
        return [statement for t, statement in self.seen if t not in probes]

    async def count(self, call: Awaitable[T]) -> tuple[T, int]:
        self.seen.clear()
        result = await call
        return result, len(self.sql)


@contextmanager
def counting(app: App) -> Iterator[Statements]:
    seen = Statements()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.seen.append((_task(), statement))

    def record_hot(_conn: int, statement: str) -> None:  # store/hot.py: raw asyncpg
        seen.seen.append((_task(), statement))

    engine = app.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    hot.observers.append(record_hot)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
        hot.observers.remove(record_hot)
