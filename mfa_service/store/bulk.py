"""Bulk reads and writes for ``mfa-service import`` (service/importer.py), in the caller's
transaction: the users' locks, their live factors, and the new factor and audit rows.

A batch of a thousand lines is four statements whatever its size. On PostgreSQL they run
on the raw asyncpg connection (as store/hot.py's do): the users' ids go as one array
parameter, and the rows as ``COPY`` (``copy_records_to_table``), which skips per-row
parameter binding and is the fastest way in. SQLite, embedded and small, runs the same
logic through SQLAlchemy (executemany).

Rows travel as plain tuples (``factor_row``, ``audit_row``), and what is read back of a
user's factors as a ``LiveFactor``: at a hundred thousand rows a run, building the
service's FactorRecord for each, and a dict on the way to the driver, was a third of the
importer's own CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import insert, select

from mfa_service.domain import DEFAULT_TOTP, FactorStatus, TotpParameters
from mfa_service.errors import StoreError
from mfa_service.store.engine import translate
from mfa_service.store.hot import naive_utc
from mfa_service.store.models import audit_events, factors
from mfa_service.store.repositories import _totp_of
from mfa_service.store.unit import Unit

# The columns written, in the order of ``factor_row`` and ``audit_row``
# (tests/test_import.py checks that every other column of the table may be left out).
FACTOR_COLUMNS = [
    "id", "user_id", "method", "status", "label", "masked_destination", "destination",
    "secret_ciphertext", "secret_key_id", "last_totp_step", "created_at", "confirmed_at",
    "last_used_at", "disabled_at", "locale", "replaces_factor_id", "established_at",
    "enrolled_session_id", "totp_algorithm", "totp_digits", "totp_period"]
AUDIT_COLUMNS = [
    "occurred_at", "event", "outcome", "user_id", "factor_id", "challenge_id", "session_id",
    "caller", "application", "client_ip", "user_agent", "detail"]
if [i for i, c in enumerate(FACTOR_COLUMNS) if c.endswith("_at")] != [10, 11, 12, 13, 16]:
    raise AssertionError("FACTOR_COLUMNS moved a time column: update insert_factors")
_DISABLED = FactorStatus.DISABLED.value


class LiveFactor(NamedTuple):
    """What the import's rules read of a user's PENDING or ACTIVE factor."""

    factor_id: str
    user_id: str
    method: str  # domain.Method's value
    status: str  # domain.FactorStatus's value
    destination: str | None
    secret_ciphertext: bytes | None
    secret_key_id: str | None
    totp_algorithm: str | None  # NULL: the default (store/models.py)
    totp_digits: int | None
    totp_period: int | None

    @property
    def totp(self) -> TotpParameters:
        return _totp_of(self.totp_algorithm, self.totp_digits, self.totp_period)


# The per-user lock of every RPC that changes a user's factors (store/security.py), for
# many users in one statement: created on first use, else row-locked until COMMIT. In
# the order of the ids, so two imports running at once cannot lock in a cycle (an RPC
# holds one user's lock only). Like every lock, it adds one to lock_version: a Challenge
# or Verify that waited for it then knows its read is older than the import
# (store/hot.py, LOCK_CHALLENGE_USER_WITH_FACTOR).
LOCK_USERS = (
    "INSERT INTO user_lockouts (user_id, consecutive_failures, admin_reset_required)"
    " SELECT u, 0, false FROM unnest($1::varchar[]) AS t(u) ORDER BY u"
    " ON CONFLICT (user_id) DO UPDATE SET lock_version = user_lockouts.lock_version + 1")
_LIVE = [factors.c.id, *(factors.c[name] for name in LiveFactor._fields[1:])]
_LIVE_FACTORS = (
    "SELECT " + ", ".join(c.name for c in _LIVE) + " FROM factors"  # noqa: S608 - our names
    f" WHERE user_id = ANY($1::varchar[]) AND status <> '{_DISABLED}'")
_SQLITE_LIVE_FACTORS = select(*_LIVE).where(factors.c.status != _DISABLED)


class RowRefused(StoreError):
    """PostgreSQL refused a row of a bulk write (a constraint, a value out of range, a
    trigger). The message names the constraint or the SQLSTATE, never a value (the
    driver's detail quotes the row)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what  # the constraint's name, or the SQLSTATE


def factor_row(*, factor_id: str, user_id: str, method: str, status: str, label: str,
               masked_destination: str, destination: str | None,
               secret_ciphertext: bytes | None, secret_key_id: str | None,
               created_at: datetime, confirmed_at: datetime | None,
               last_used_at: datetime | None, established_at: datetime | None, locale: str,
               totp: TotpParameters | None = None) -> tuple[Any, ...]:
    """A new factor row in ``FACTOR_COLUMNS`` order (aware datetimes; ``totp`` None or
    the default: NULL columns)."""
    t = None if totp is None or totp == DEFAULT_TOTP else totp
    return (factor_id, user_id, method, status, label, masked_destination, destination,
            secret_ciphertext, secret_key_id, None, created_at, confirmed_at, last_used_at,
            None, locale, None, established_at, None,
            t.algorithm.value if t else None, t.digits if t else None,
            t.period if t else None)


def audit_rows_of(template: dict[str, Any]) -> Callable[[str, str, str], tuple[Any, ...]]:
    """Rows in ``AUDIT_COLUMNS`` order of one event (``template``: service/audit.py's
    ``event_row``) for many factors: each row takes the template's values but its own
    ``user_id``, ``factor_id`` and ``detail``."""
    row = [template[c] for c in AUDIT_COLUMNS]
    user, factor, detail = (AUDIT_COLUMNS.index(c) for c in ("user_id", "factor_id", "detail"))
    if (user, factor, detail) != (3, 4, len(AUDIT_COLUMNS) - 1):  # pragma: no cover
        raise AssertionError("AUDIT_COLUMNS changed: update audit_rows_of")
    head, middle = tuple(row[:3]), tuple(row[5:-1])
    return lambda user_id, factor_id, detail_json: (*head, user_id, factor_id, *middle,
                                                    detail_json)


async def lock_users(unit: Unit, user_ids: Sequence[str]) -> None:
    """Take the per-user lock of each of ``user_ids`` (distinct), until the transaction
    ends. SQLite: BEGIN IMMEDIATE already holds the database's only write lock."""
    if unit.postgres:
        driver = await unit.driver()
        await driver.execute(LOCK_USERS, sorted(user_ids))


async def live_factors(unit: Unit, user_ids: Sequence[str]) -> dict[str, list[LiveFactor]]:
    """The PENDING and ACTIVE factors of ``user_ids``, by user (what Enroll's rules read)."""
    by_user: dict[str, list[LiveFactor]] = {u: [] for u in user_ids}
    if unit.postgres:
        driver = await unit.driver()
        rows: Any = await driver.fetch(_LIVE_FACTORS, list(user_ids))
    else:
        rows = await unit.execute(_SQLITE_LIVE_FACTORS.where(factors.c.user_id.in_(user_ids)))
    for row in rows:
        live = LiveFactor(*row)
        by_user[live.user_id].append(live)
    return by_user


async def insert_factors(unit: Unit, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``factor_row``s as they are (ids, ciphertexts and times already made)."""
    if not rows:
        return
    if not unit.postgres:
        await unit.execute_many(insert(factors), [dict(zip(FACTOR_COLUMNS, row, strict=True))
                                                  for row in rows])
        return
    stamp = _Stamps()
    # The time columns by position (checked against FACTOR_COLUMNS at import, above).
    await _copy(unit, factors.name, FACTOR_COLUMNS, [
        (*row[:10], stamp(row[10]), stamp(row[11]), stamp(row[12]), stamp(row[13]),
         row[14], row[15], stamp(row[16]), *row[17:]) for row in rows])


async def insert_audit(unit: Unit, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append ``audit_row``s (``id`` comes from its sequence)."""
    if not rows:
        return
    if not unit.postgres:
        await unit.execute_many(insert(audit_events),
                                [dict(zip(AUDIT_COLUMNS, row, strict=True)) for row in rows])
        return
    stamp = _Stamps()
    await _copy(unit, audit_events.name, AUDIT_COLUMNS,
                [(stamp(row[0]), *row[1:]) for row in rows])


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
                records: Sequence[Sequence[Any]]) -> None:
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
