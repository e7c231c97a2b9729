"""Bulk reads and writes for ``mfa-service import`` (service/importer.py), in the caller's
transaction: the users' locks, their live factors, and the new factor and audit rows.

A batch of a thousand lines is four statements whatever its size. On PostgreSQL they run
on the raw asyncpg connection (as store/hot.py's do): the users' ids go as one array
parameter, and the rows as ``COPY`` (``copy_records_to_table``), which skips per-row
parameter binding and is the fastest way in. SQLite, embedded and small, runs the same
logic through SQLAlchemy (executemany).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from mfa_service.domain import FactorRecord, FactorStatus
from mfa_service.errors import StoreError
from mfa_service.store.hot import aware, naive_utc
from mfa_service.store.models import audit_events, factors
from mfa_service.store.repositories import _factor_of, _factor_row
from mfa_service.store.unit import Unit

_FACTOR_COLUMNS = [c.name for c in factors.c]
_AUDIT_COLUMNS = [c.name for c in audit_events.c if c.name != "id"]  # id: its sequence
_DISABLED = FactorStatus.DISABLED.value

# The per-user lock of every RPC that changes a user's factors (store/security.py), for
# many users in one statement: created on first use, else row-locked until COMMIT. In
# the order of the ids, so two imports running at once cannot lock in a cycle (an RPC
# holds one user's lock only).
_LOCK_USERS = (
    "INSERT INTO user_lockouts (user_id, consecutive_failures, admin_reset_required)"
    " SELECT u, 0, false FROM unnest($1::varchar[]) AS t(u) ORDER BY u"
    " ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id")
_LIVE_FACTORS = (
    "SELECT " + ", ".join(_FACTOR_COLUMNS) + " FROM factors"  # noqa: S608 - our own columns
    f" WHERE user_id = ANY($1::varchar[]) AND status <> '{_DISABLED}'")
_SQLITE_LIVE_FACTORS = select(factors).where(factors.c.status != _DISABLED)


class RowRefused(StoreError):
    """PostgreSQL refused a row of a bulk write (a constraint, a value out of range). The
    message names the constraint or the SQLSTATE, never a value (the driver's detail
    quotes the row)."""


async def lock_users(unit: Unit, user_ids: Sequence[str]) -> None:
    """Take the per-user lock of each of ``user_ids`` (distinct), until the transaction
    ends. SQLite: BEGIN IMMEDIATE already holds the database's only write lock."""
    if unit.postgres:
        driver = await unit.driver()
        await driver.execute(_LOCK_USERS, sorted(user_ids))


async def live_factors(unit: Unit, user_ids: Sequence[str]) -> dict[str, list[FactorRecord]]:
    """The PENDING and ACTIVE factors of ``user_ids``, by user (what Enroll's rules read)."""
    by_user: dict[str, list[FactorRecord]] = {u: [] for u in user_ids}
    if unit.postgres:
        driver = await unit.driver()
        for row in await driver.fetch(_LIVE_FACTORS, list(user_ids)):
            record = _factor_of(aware(row))
            by_user[record.factor.user_id].append(record)
        return by_user
    rows = await unit.execute(_SQLITE_LIVE_FACTORS.where(factors.c.user_id.in_(user_ids)))
    for row in rows:
        record = _factor_of(row._mapping)
        by_user[record.factor.user_id].append(record)
    return by_user


async def insert_factors(unit: Unit, records: Sequence[FactorRecord]) -> None:
    """Insert ``records`` as they are (ids, ciphertexts and times already made)."""
    rows = [_factor_row(r) for r in records]
    await _insert(unit, factors.name, _FACTOR_COLUMNS, rows)


async def insert_audit(unit: Unit, events: Sequence[dict[str, Any]]) -> None:
    """Append audit rows (each with every column but ``id``: service/audit.py's shape)."""
    await _insert(unit, audit_events.name, _AUDIT_COLUMNS, events)


async def _insert(unit: Unit, table: str, columns: list[str],
                  rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    if not unit.postgres:
        target = factors if table == factors.name else audit_events
        await unit.conn.execute(insert(target), list(rows))
        return
    import asyncpg

    # COPY bypasses the column types: the timestamps go as the naive UTC they are stored.
    records = [tuple(naive_utc(v) if isinstance(v, datetime) else v
                     for v in (row[c] for c in columns)) for row in rows]
    driver = await unit.driver()
    try:
        await driver.copy_records_to_table(table, records=records, columns=columns)
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        what = getattr(exc, "constraint_name", None) or f"SQLSTATE {exc.sqlstate}"
        raise RowRefused(f"the database refused a row of {table} ({what})") from exc
