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

from mfa_service.domain import DEFAULT_TOTP, FactorRecord, FactorStatus
from mfa_service.errors import StoreError
from mfa_service.store.engine import translate
from mfa_service.store.hot import aware, naive_utc
from mfa_service.store.models import audit_events, factors
from mfa_service.store.repositories import _factor_of, _factor_row
from mfa_service.store.unit import Unit

# The columns COPY writes, in the order of the tuples below (tests/test_import.py checks
# that every other column of the table may be left out).
FACTOR_COLUMNS = [
    "id", "user_id", "method", "status", "label", "masked_destination", "destination",
    "secret_ciphertext", "secret_key_id", "last_totp_step", "created_at", "confirmed_at",
    "last_used_at", "disabled_at", "locale", "replaces_factor_id", "established_at",
    "enrolled_session_id", "totp_algorithm", "totp_digits", "totp_period"]
AUDIT_COLUMNS = [
    "occurred_at", "event", "outcome", "user_id", "factor_id", "challenge_id", "session_id",
    "caller", "application", "client_ip", "user_agent", "detail"]
_SELECT_COLUMNS = ", ".join(c.name for c in factors.c)
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
    f"SELECT {_SELECT_COLUMNS} FROM factors"  # noqa: S608 - our own column names
    f" WHERE user_id = ANY($1::varchar[]) AND status <> '{_DISABLED}'")
_SQLITE_LIVE_FACTORS = select(factors).where(factors.c.status != _DISABLED)


class RowRefused(StoreError):
    """PostgreSQL refused a row of a bulk write (a constraint, a value out of range). The
    message names the constraint or the SQLSTATE, never a value (the driver's detail
    quotes the row)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what  # the constraint's name, or the SQLSTATE


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
    if not records:
        return
    if not unit.postgres:
        await unit.conn.execute(insert(factors), [_factor_row(r) for r in records])
        return
    stamp = _Stamps()
    rows = []
    for r in records:
        f, t = r.factor, r.totp
        default = t is DEFAULT_TOTP or t == DEFAULT_TOTP  # NULL columns (store/models.py)
        rows.append((
            f.factor_id, f.user_id, f.method.value, f.status.value, r.label,
            f.masked_destination, r.destination, r.secret_ciphertext, r.secret_key_id,
            r.last_totp_step, stamp(f.created_at), stamp(f.confirmed_at),
            stamp(f.last_used_at), stamp(f.disabled_at), r.locale, r.replaces_factor_id,
            stamp(f.established_at), r.enrolled_session_id,
            None if default else t.algorithm.value, None if default else t.digits,
            None if default else t.period))
    await _copy(unit, factors.name, FACTOR_COLUMNS, rows)


async def insert_audit(unit: Unit, events: Sequence[dict[str, Any]]) -> None:
    """Append audit rows (service/audit.py: ``event_row``'s shape, every column but the
    ``id`` its sequence gives)."""
    if not events:
        return
    if not unit.postgres:
        await unit.conn.execute(insert(audit_events), list(events))
        return
    stamp = _Stamps()
    await _copy(unit, audit_events.name, AUDIT_COLUMNS, [
        (stamp(e["occurred_at"]), e["event"], e["outcome"], e["user_id"], e["factor_id"],
         e["challenge_id"], e["session_id"], e["caller"], e["application"], e["client_ip"],
         e["user_agent"], e["detail"]) for e in events])


class _Stamps:
    """Aware datetimes as the naive UTC the columns hold (COPY bypasses the column type,
    store/models.py: UTCDateTime). A batch's rows share a handful of instants: each is
    converted once."""

    def __init__(self) -> None:
        self._seen: dict[datetime, datetime] = {}

    def __call__(self, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        naive = self._seen.get(value)
        if naive is None:
            naive = self._seen[value] = naive_utc(value)
        return naive


async def _copy(unit: Unit, table: str, columns: list[str],
                records: list[tuple[Any, ...]]) -> None:
    import asyncpg

    driver = await unit.driver()
    try:
        await driver.copy_records_to_table(table, records=records, columns=columns)
    except asyncpg.PostgresError as exc:
        mapped = translate(exc)
        if mapped is not None:  # the server is gone, or a retryable conflict
            raise mapped from exc
        # The server refused the rows themselves: a constraint, a value, a trigger.
        what = getattr(exc, "constraint_name", None) or f"SQLSTATE {exc.sqlstate}"
        raise RowRefused(f"the database refused a row of {table} ({what})", what) from exc
