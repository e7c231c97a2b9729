"""The hot statements, run on the raw asyncpg connection on PostgreSQL.

CheckSession is the call every page of both applications makes. SQLAlchemy's execution
path around asyncpg (compiled-cache lookup, parameter and result processing, the adapter's
own prepared-statement layer) cost about 0.1 ms of CPU per statement more than asyncpg
alone on this project's 2-core benchmark box (measured: 353 µs against 257 µs per
sequential CheckSession read, round trip included). So the hottest statements are written
here once, as SQL text, and run with asyncpg's ``fetchrow`` on the connection the unit of
work already holds: inside its transaction when there is one, in autocommit for the
CheckSession read. asyncpg prepares each text once per connection (its statement cache) and
then only binds and executes. Behind PgBouncer in transaction mode the statement cache is
off (store/engine.py) and asyncpg sends the same text unnamed: what works there.

SQLite runs the same logical statement through SQLAlchemy (store/repositories.py);
tests run every CheckSession path on both databases and hold them to the same answers.
SQLAlchemy stays the schema authority: the column lists here are taken from store/models.py
at import, and tests/api/test_statements.py runs these statements on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from mfa_service.domain import Application, Channel, Method, Session
from mfa_service.store.models import challenges, factors, user_lockouts

# Who hears of each hot statement run (connection id, SQL): they bypass SQLAlchemy's
# events, so the statement-count tests and the SQL spans (telemetry.py) listen here.
observers: list[Callable[[int, str], None]] = []

# What ``session_from`` reads. Timestamps are stored naive UTC (store/models.py:
# UTCDateTime).
_SESSION_COLUMNS = ("id, user_id, factor_id, method, application, authenticated_at,"
                    " expires_at, idle_expires_at, channel, device_id")
# A session with one of the token hashes (one per key of the ring) that is still live.
_LIVE_BY_HASH = ("token_hash = ANY($1::bytea[]) AND revoked_at IS NULL"
                 " AND expires_at > $2 AND idle_expires_at > $2")
FIND_LIVE_SESSION = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {_LIVE_BY_HASH} LIMIT 1"


# The idle deadline's slide (service/sessions.py: at most once a minute per session),
# conditional on the session still being live, as it is *now*: a revocation that
# committed while this UPDATE waited for the row wins (no row). Never past the absolute
# expiry. One statement: atomic in autocommit, so it runs on the connection of the read
# that found it due, without BEGIN and COMMIT. (Tried: the read and this slide in one
# statement, a data-modifying CTE. PostgreSQL then sets up the UPDATE on every check:
# a round trip of 240 µs against 170 µs, measured one after another on this project's
# benchmark box, for a slide that is due at most once a minute.)
TOUCH_LIVE_SESSION = (
    "UPDATE sessions SET idle_expires_at = LEAST(expires_at, $3::timestamp)"
    f" WHERE {_LIVE_BY_HASH} RETURNING {_SESSION_COLUMNS}")


class SessionReads:
    """CheckSession's two statements on PostgreSQL, run by ``read``: ``Database.read_hot``
    (each on its own in autocommit, no unit of work: a direct connection) or a unit's
    ``fetchrow`` (SessionRepository: inside its transaction, as behind PgBouncer)."""

    def __init__(self, read: Callable[..., Awaitable[Any]]) -> None:
        self._read = read

    async def find_live(self, token_hashes: Sequence[bytes], now: datetime) -> Session | None:
        row = await self._read(FIND_LIVE_SESSION, list(token_hashes), naive_utc(now))
        return session_from(row) if row is not None else None

    async def touch_live(self, token_hashes: Sequence[bytes], now: datetime,
                         idle_until: datetime) -> Session | None:
        row = await self._read(TOUCH_LIVE_SESSION, list(token_hashes), naive_utc(now),
                               naive_utc(idle_until))
        return session_from(row) if row is not None else None


def naive_utc(value: datetime) -> datetime:
    """An aware datetime as the naive UTC the columns hold."""
    return value.astimezone(UTC).replace(tzinfo=None)


def session_from(row: Any) -> Session:
    """A ``FIND_LIVE_SESSION`` row as a Session (aware UTC datetimes)."""
    return Session(
        session_id=row["id"], user_id=row["user_id"], factor_id=row["factor_id"],
        method=Method(row["method"]), application=Application(row["application"]),
        authenticated_at=row["authenticated_at"].replace(tzinfo=UTC),
        expires_at=row["expires_at"].replace(tzinfo=UTC),
        idle_expires_at=row["idle_expires_at"].replace(tzinfo=UTC),
        channel=Channel(row["channel"]) if row["channel"] is not None else None,
        device_id=row["device_id"])


# Column lists from the schema authority (store/models.py), at import: no input in them.
_FACTOR_COLUMNS = ", ".join(c.name for c in factors.c)
_CHALLENGE_COLUMNS = ", ".join(c.name for c in challenges.c)
_LOCKOUT_COLUMNS = ", ".join(c.name for c in user_lockouts.c)

# The per-user lock (store/security.py): create the counter row on first use or lock the
# existing one, and return it; ON CONFLICT DO UPDATE takes the row lock, and adds one to
# lock_version (models.UserLockoutRow).
_ON_CONFLICT_LOCK = (" ON CONFLICT (user_id) DO UPDATE"
                     " SET lock_version = user_lockouts.lock_version + 1")
LOCK_USER = (
    "INSERT INTO user_lockouts (user_id, consecutive_failures, admin_reset_required)"
    " VALUES ($1, 0, false)" + _ON_CONFLICT_LOCK + f" RETURNING {_LOCKOUT_COLUMNS}")
# Verify's first round trip: the lock of the challenge's user *and* the challenge with its
# factor, in one statement. Its snapshot is taken when it starts, before the lock is
# granted: if another transaction of the user held the lock and committed meanwhile, the
# challenge and factor read here are older than the lock. Every lock adds one to
# lock_version and the row is never deleted, so the read is current exactly when the
# version written (l.lock_version) is one more than the version the snapshot saw
# (seen_version); otherwise, and when the row is new, the caller reads again
# (ChallengeRepository.locked_with_factor). Lockout columns prefixed "l_",
# factor columns "f_".
LOCK_CHALLENGE_USER_WITH_FACTOR = (
    "WITH l AS (INSERT INTO user_lockouts"
    " (user_id, consecutive_failures, admin_reset_required)"
    " SELECT user_id, 0, false FROM challenges WHERE id = $1"
    + _ON_CONFLICT_LOCK + f" RETURNING {_LOCKOUT_COLUMNS})"
    " SELECT " + ", ".join(f"l.{c.name} AS l_{c.name}" for c in user_lockouts.c)
    + ", (SELECT s.lock_version FROM user_lockouts AS s WHERE s.user_id = l.user_id)"
    " AS seen_version, "
    + ", ".join(f"c.{c.name}" for c in challenges.c) + ", "
    + ", ".join(f"f.{c.name} AS f_{c.name}" for c in factors.c)
    + " FROM l JOIN challenges AS c ON c.id = $1"
    " JOIN factors AS f ON f.id = c.factor_id")
GET_FACTOR = f"SELECT {_FACTOR_COLUMNS} FROM factors WHERE id = $1"
# Challenge's first round trip: the user's lock and the factor, read as
# LOCK_CHALLENGE_USER_WITH_FACTOR reads (the same check of lock_version says whether the
# read is current). No such factor: the f_ columns are NULL.
LOCK_USER_WITH_FACTOR = (
    "WITH l AS (INSERT INTO user_lockouts"
    " (user_id, consecutive_failures, admin_reset_required) VALUES ($1, 0, false)"
    + _ON_CONFLICT_LOCK + f" RETURNING {_LOCKOUT_COLUMNS})"
    " SELECT " + ", ".join(f"l.{c.name} AS l_{c.name}" for c in user_lockouts.c)
    + ", (SELECT s.lock_version FROM user_lockouts AS s WHERE s.user_id = $1)"
    " AS seen_version, "
    + ", ".join(f"f.{c.name} AS f_{c.name}" for c in factors.c)
    + " FROM l LEFT JOIN factors AS f ON f.id = $2")
# A challenge and its factor in one read (factor columns prefixed "f_").
CHALLENGE_WITH_FACTOR = (
    "SELECT " + ", ".join(f"c.{c.name}" for c in challenges.c) + ", "
    + ", ".join(f"f.{c.name} AS f_{c.name}" for c in factors.c)
    + " FROM challenges AS c JOIN factors AS f ON f.id = c.factor_id WHERE c.id = $1")
# The same two reads for an optimistic unit (store/unit.py): no lock, the user's counter
# row as it is (lock_version among its columns; NULL columns when there is none yet).
USER_WITH_FACTOR = (
    "SELECT " + ", ".join(f"l.{c.name} AS l_{c.name}" for c in user_lockouts.c) + ", "
    + ", ".join(f"f.{c.name} AS f_{c.name}" for c in factors.c)
    + " FROM (SELECT $1::varchar AS user_id) AS u"
    " LEFT JOIN user_lockouts AS l ON l.user_id = u.user_id"
    " LEFT JOIN factors AS f ON f.id = $2")
CHALLENGE_USER_WITH_FACTOR = (
    "SELECT " + ", ".join(f"l.{c.name} AS l_{c.name}" for c in user_lockouts.c) + ", "
    + ", ".join(f"c.{c.name}" for c in challenges.c) + ", "
    + ", ".join(f"f.{c.name} AS f_{c.name}" for c in factors.c)
    + " FROM challenges AS c JOIN factors AS f ON f.id = c.factor_id"
    " LEFT JOIN user_lockouts AS l ON l.user_id = c.user_id WHERE c.id = $1")
# What an optimistic unit may run before its writes: reads, each atomic on its own.
OPTIMISTIC_READS = frozenset({USER_WITH_FACTOR, CHALLENGE_USER_WITH_FACTOR, GET_FACTOR,
                              CHALLENGE_WITH_FACTOR})


def aware(row: Any) -> dict[str, Any]:
    """An asyncpg record as a mapping with aware UTC datetimes (the columns hold naive UTC,
    as SQLAlchemy's UTCDateTime type would have returned them)."""
    return {k: (v.replace(tzinfo=UTC) if isinstance(v, datetime) else v)
            for k, v in row.items()}
