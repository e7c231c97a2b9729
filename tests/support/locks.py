"""Another transaction holding a user's lock, as a concurrent call of that user would
(PostgreSQL): for the tests that play what a call must survive while it waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from mfa_service.app import App
from mfa_service.store import bulk, hot


@dataclass
class HeldLock:
    holder: Any  # the asyncpg connection whose open transaction holds the lock
    watcher: Any  # another, to look at pg_stat_activity
    transaction: Any

    async def until_waiting(self, query: str) -> None:
        await until_waiting(self.watcher, query)

    async def commit(self) -> None:
        await self.transaction.commit()


async def until_waiting(watcher: Any, query: str) -> None:
    """Until exactly one statement LIKE ``query`` waits for a lock in this database
    (``watcher``: an asyncpg connection to it)."""
    for _ in range(500):
        waiting = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE $1", query)
        if waiting:
            break
        await asyncio.sleep(0.01)
    assert waiting == 1, f"no statement LIKE {query!r} waited for a lock"


@asynccontextmanager
async def users_lock_held(app: App, user_id: str, *,
                          importing: bool = False) -> AsyncIterator[HeldLock]:
    """The user's lock, taken as every call of the user takes it (``importing``: as the
    bulk import takes it) in a transaction left open for the caller to change things in
    (``held.holder``) and commit."""
    engine = app.database.engine
    async with engine.connect() as holding, engine.connect() as watching:
        holder = (await holding.get_raw_connection()).driver_connection
        watcher = (await watching.get_raw_connection()).driver_connection
        assert holder is not None and watcher is not None
        transaction = holder.transaction()
        await transaction.start()
        if importing:
            await holder.execute(bulk.LOCK_USERS, [user_id])
        else:
            await holder.fetchrow(hot.LOCK_USER, user_id)
        yield HeldLock(holder, watcher, transaction)
