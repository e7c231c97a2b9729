"""``mfa-service loadtest seed``: a population written straight into the store.

Enrolling through the API costs the server ~26 ms of CPU per user (the QR codes), so a
million users would take hours. This writes, per user, exactly the rows a real Enroll +
confirming Verify leaves behind, with multi-row inserts (PostgreSQL: COPY through
asyncpg's ``copy_records_to_table``; SQLite: executemany), one transaction per batch:

- the authenticator-app factor, ACTIVE, its 160-bit secret AES-256-GCM encrypted under the
  keyring's primary key with the service's associated data (``factors.totp.secret_aad``:
  factor id and user id), ``last_totp_step`` = the step of the seeding time (as if the
  first code had just confirmed it);
- the recovery-code factor, ACTIVE: ``service.recovery.Recovery.issue_first`` creates it
  with the first active factor, and the service relies on it being there once a real factor is
  ACTIVE (RegenerateRecoveryCodes, the retirement when the last factor is disabled, and no
  second issue of codes when another factor is confirmed). Its 10 codes are optional
  (``--recovery-codes``): they are 10 extra rows and HMACs per user that no load scenario
  reads, and the codes could never be used anyway (nobody was shown them). Without them
  the user is in the state of one who has used all ten: a state the service produces.
- the confirming challenge: Enroll opened it (CONFIRM_ENROLLMENT, on the app, no code of
  ours: the app makes the codes) and the first code approved it. The retention deletes a
  challenge a day after it expires, so a service in use holds about a day's challenges,
  of the order of its users; a seeded database without them would hold none, and the
  plans PostgreSQL makes for the challenge statements would be made for an empty table
  (a sequential scan, kept as the prepared statement's plan while the table grows: the
  login benchmark spent most of the database's CPU there, docs/BENCHMARKS.md);
- the user's lockout counter (``user_lockouts``), which Enroll's per-user lock creates
  and the confirming Verify locks again: no failures, ``lock_version`` 1. A user who
  has enrolled always has this row (it is never deleted), so the population's first
  Challenge costs what a returning user's does;
- for the first M users, one live session each, its 256-bit token stored as the service
  stores it (``service.sessions.token_hash``: HMAC-SHA256 under the primary key),
  alternately opened on the portal and the backoffice, with the server's lifetimes
  (MFA_SESSION_TTL_SECONDS, MFA_SESSION_IDLE_SECONDS: seeded sessions idle out after 30
  minutes by default unless checked).

Not written: the audit trail of those events and the "factor added" notices (history and
messages, not state the RPCs read). The keyring and database are read as ``serve`` reads
them (Settings, ``app.load_keyring``), so ``serve`` with the same environment accepts the
seeded codes and sessions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from sqlalchemy import Table, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from mfa_service.crypto import Keyring, new_token
from mfa_service.domain import (
    Application,
    ChallengeState,
    Channel,
    FactorStatus,
    Method,
    Purpose,
)
from mfa_service.factors.recovery import generate_codes, hash_codes
from mfa_service.factors.totp import SECRET_BYTES, secret_aad
from mfa_service.loadtest.config import LoadTestError, SeedConfig
from mfa_service.loadtest.users import time_step
from mfa_service.service.sessions import token_hash
from mfa_service.settings import Settings
from mfa_service.store import migrate
from mfa_service.store.engine import create_engine, database_url
from mfa_service.store.models import (
    challenges,
    factors,
    recovery_codes,
    sessions,
    user_lockouts,
)

CALLER = "loadtest-seed"  # who opened the seeded sessions and challenges (their caller)
RECOVERY_LABEL = "recovery codes"  # as service/recovery.py labels that factor

FACTOR_COLUMNS = ("id", "user_id", "method", "status", "label", "masked_destination",
                  "secret_ciphertext", "secret_key_id", "last_totp_step", "created_at",
                  "confirmed_at", "last_used_at", "established_at")
SESSION_COLUMNS = ("id", "token_hash", "token_key_id", "user_id", "factor_id", "method",
                   "application", "caller", "authenticated_at", "expires_at",
                   "idle_expires_at")
CHALLENGE_COLUMNS = ("id", "user_id", "factor_id", "purpose", "application", "channel",
                     "state", "attempts", "max_attempts", "caller", "created_at",
                     "expires_at", "approved_at")
CODE_COLUMNS = ("id", "user_id", "code_hash", "key_id", "created_at")
LOCKOUT_COLUMNS = ("user_id", "consecutive_failures", "admin_reset_required", "lock_version")
# Enroll's lock inserted the row (version 0), the confirming Verify's lock added one.
ENROLLED_LOCK_VERSION = 1


@dataclass(frozen=True)
class SeedResult:
    users: int
    sessions: int
    recovery_codes: int
    seconds: float
    backend: str
    prefix: str

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Batch:
    """The rows of one transaction, and the users-file lines written once it commits."""

    start: int  # the index of its first user
    factors: list[tuple[Any, ...]] = field(default_factory=list)
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    challenges: list[tuple[Any, ...]] = field(default_factory=list)
    codes: list[tuple[Any, ...]] = field(default_factory=list)
    lockouts: list[tuple[Any, ...]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def random_uuids(n: int) -> list[str]:
    """``n`` random version-4 UUIDs as lowercase text (what ``str(uuid.uuid4())`` gives,
    at a third of the cost: one urandom call for all of them)."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # RFC 4122 variant
    h = raw.hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-"
            f"{h[i + 20:i + 32]}" for i in range(0, 32 * n, 32)]


class Population:
    """Makes the rows of users ``start .. start+count`` (pure but for randomness)."""

    def __init__(self, keyring: Keyring, *, prefix: str, sessions: int, now: datetime,
                 ttl: timedelta, idle: timedelta, recovery_codes: bool,
                 code_ttl: timedelta, max_attempts: int,
                 stamp: Callable[[datetime], Any]) -> None:
        self._keyring = keyring
        self._prefix = prefix
        self._sessions = sessions
        self._step = time_step(now)
        self._codes = recovery_codes
        # ``stamp``: how this backend's insert path wants a datetime.
        self._now = stamp(now)
        self._expires = stamp(now + ttl)
        self._idle = stamp(min(now + idle, now + ttl))
        self._code_expires = stamp(now + code_ttl)
        self._max_attempts = max_attempts

    def user_id(self, index: int) -> str:
        return f"{self._prefix}-{index + 1:07d}"

    def batch(self, start: int, count: int) -> Batch:
        out = Batch(start)
        ids = random_uuids(count * 4)
        # 20 bytes = 160 bits = 32 base32 characters exactly: one encoding of all secrets
        # is the concatenation of each secret's encoding.
        raw = secrets.token_bytes(SECRET_BYTES * count)
        b32 = base64.b32encode(raw).decode()
        app, active = Method.AUTHENTICATOR_APP.value, FactorStatus.ACTIVE.value
        recovery = Method.RECOVERY_CODE.value
        confirm, approved = Purpose.CONFIRM_ENROLLMENT.value, ChallengeState.APPROVED.value
        no_channel = Channel.NONE.value
        now, step = self._now, self._step
        for k in range(count):
            index = start + k
            user_id = self.user_id(index)
            factor_id, recovery_id, session_id, challenge_id = ids[4 * k:4 * k + 4]
            secret = raw[SECRET_BYTES * k:SECRET_BYTES * (k + 1)]
            key_id, ciphertext = self._keyring.encrypt(secret, secret_aad(factor_id, user_id))
            # The label and masked destination the service gives an app enrolled without
            # an account name: the user id (ours have no ':').
            # A first factor and the codes issued with it are established at once
            # (service/policy.py): they may disable a factor or regenerate codes.
            out.factors.append((factor_id, user_id, app, active, user_id, user_id, ciphertext,
                                key_id, step, now, now, now, now))
            out.factors.append((recovery_id, user_id, recovery, active, RECOVERY_LABEL,
                                RECOVERY_LABEL, None, None, None, now, now, now, now))
            out.lockouts.append((user_id, 0, False, ENROLLED_LOCK_VERSION))
            application = (Application.PORTAL if index % 2 == 0
                           else Application.BACKOFFICE).value
            out.challenges.append((challenge_id, user_id, factor_id, confirm, application,
                                   no_channel, approved, 1, self._max_attempts, CALLER, now,
                                   self._code_expires, now))
            token: str | None = None
            if index < self._sessions:
                token = new_token()
                mac_id, digest = token_hash(self._keyring, token)
                out.sessions.append((session_id, digest, mac_id, user_id, factor_id, app,
                                     application, CALLER, now, self._expires, self._idle))
            if self._codes:
                for (code_key, code_hash), code_id in zip(
                        hash_codes(self._keyring, user_id, generate_codes()),
                        random_uuids(10), strict=True):
                    out.codes.append((code_id, user_id, code_hash, code_key, now))
            # users.user_line's format, without json.dumps (a fifth of the cost): every
            # value here is JSON-safe as it is (checked prefix, UUID, base32, base64url).
            token_json = f'"{token}"' if token else "null"
            out.lines.append(
                f'{{"user_id":"{user_id}","factor_id":"{factor_id}","totp_secret":'
                f'"{b32[32 * k:32 * (k + 1)]}","session_token":{token_json},'
                f'"last_totp_step":{step}}}\n')
        return out


# -- writers --------------------------------------------------------------------------------
class PostgresWriter:
    """COPY (asyncpg ``copy_records_to_table``) on the store's engine, one transaction per
    batch, on ``connections`` connections at once: PostgreSQL's index upkeep is most of the
    work (~16 µs of a backend's CPU per row here), and two backends use both cores while
    this process makes the next batches."""

    def __init__(self, engine: AsyncEngine, connections: int = 2) -> None:
        self._engine = engine
        self._connections = connections

    @staticmethod
    def stamp(at: datetime) -> datetime:
        # The columns are naive UTC (models.UTCDateTime); COPY bypasses that type.
        return at.astimezone(UTC).replace(tzinfo=None)

    async def write(self, batches: AsyncIterator[Batch],
                    committed: Callable[[Batch], None]) -> None:
        lock = asyncio.Lock()  # one consumer pulls the next batch at a time

        async def consume() -> None:
            async with self._engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                while True:
                    async with lock:
                        batch = await anext(batches, None)
                    if batch is None:
                        return
                    async with driver.transaction():
                        for table, columns, rows in _tables(batch):
                            await driver.copy_records_to_table(table.name, records=rows,
                                                               columns=list(columns))
                    committed(batch)

        tasks = [asyncio.create_task(consume()) for _ in range(self._connections)]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed: stop the others before the engine goes away
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._engine.connect() as conn:
            # Fresh statistics, so the first queries plan with the real table sizes.
            await conn.execute(text(
                "ANALYZE factors, challenges, sessions, recovery_codes, user_lockouts"))
            await conn.commit()


class SqliteWriter:
    """executemany through SQLAlchemy (the store's own column types), a transaction per
    batch."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @staticmethod
    def stamp(at: datetime) -> datetime:
        return at

    async def write(self, batches: AsyncIterator[Batch],
                    committed: Callable[[Batch], None]) -> None:
        async for batch in batches:
            async with self._engine.begin() as conn:
                for table, columns, rows in _tables(batch):
                    await conn.execute(insert(table), [dict(zip(columns, row, strict=True))
                                                       for row in rows])
            committed(batch)
        async with self._engine.begin() as conn:
            await conn.execute(text("ANALYZE"))


def _tables(batch: Batch) -> list[tuple[Table, Sequence[str], list[tuple[Any, ...]]]]:
    # Factors first: the challenges reference them by foreign key, and a reader sees a
    # user's factor before its session.
    return [(t, c, rows) for t, c, rows in ((factors, FACTOR_COLUMNS, batch.factors),
                                            (challenges, CHALLENGE_COLUMNS, batch.challenges),
                                            (sessions, SESSION_COLUMNS, batch.sessions),
                                            (recovery_codes, CODE_COLUMNS, batch.codes),
                                            (user_lockouts, LOCKOUT_COLUMNS, batch.lockouts))
            if rows]


async def _batches(population: Population, users: int, size: int) -> AsyncIterator[Batch]:
    """The batches in order; the next one is made in a thread while the caller writes
    this one (the database works on the other core meanwhile)."""
    loop = asyncio.get_running_loop()
    starts = range(0, users, size)
    pending = loop.run_in_executor(None, population.batch, 0, min(size, users))
    for i in range(len(starts)):
        batch = await pending
        if i + 1 < len(starts):
            nxt = starts[i + 1]
            pending = loop.run_in_executor(None, population.batch, nxt, min(size, users - nxt))
        yield batch


# -- the command ----------------------------------------------------------------------------
async def seed(settings: Settings, keyring: Keyring, config: SeedConfig, *,
               now: datetime | None = None, progress: TextIO | None = None) -> SeedResult:
    """Seed ``config.users`` users into the database of ``settings``; ``now`` is the time
    the rows say they were made (the server's clock: tests pass their fixed one)."""
    config.check()
    now = now or datetime.now(UTC)
    prefix = config.prefix or f"seed-{secrets.token_hex(4)}"
    password = (settings.database_password.get_secret_value()
                if settings.database_password else None)
    engine = create_engine(database_url(settings.database_url, password), pool_size=2,
                           timeout=settings.database_timeout_seconds)
    writer: PostgresWriter | SqliteWriter = (
        SqliteWriter(engine) if settings.is_sqlite else PostgresWriter(engine))
    population = Population(
        keyring, prefix=prefix, sessions=config.sessions, now=now,
        ttl=timedelta(seconds=settings.session_ttl_seconds),
        idle=timedelta(seconds=settings.session_idle_seconds),
        recovery_codes=config.recovery_codes,
        code_ttl=timedelta(seconds=settings.code_ttl_seconds),
        max_attempts=settings.max_attempts, stamp=writer.stamp)
    written = 0
    started = time.perf_counter()
    try:
        if settings.is_sqlite:
            await migrate.upgrade(engine)  # as `serve` does on the embedded default
        else:
            await migrate.require_current_schema(engine)
        # The file holds TOTP secrets and session tokens: readable by its owner only.
        fd = os.open(config.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:

            waiting: dict[int, Batch] = {}

            def committed(batch: Batch) -> None:
                # Two connections may commit out of order; the file stays in user order
                # (so --users N takes the first N users, sessions first).
                nonlocal written
                waiting[batch.start] = batch
                while written in waiting:
                    ready = waiting.pop(written)
                    out.writelines(ready.lines)
                    written += len(ready.lines)
                if progress is not None:
                    rate = written / (time.perf_counter() - started)
                    progress.write(f"seeded {written}/{config.users} users ({rate:,.0f}/s)\n")
                    progress.flush()

            await writer.write(_batches(population, config.users, config.batch), committed)
    except LoadTestError:
        raise
    except Exception as exc:
        raise LoadTestError(f"seeding failed after {written} users: "
                            f"{type(exc).__name__}: {exc}") from exc
    finally:
        await engine.dispose()
    return SeedResult(users=written, sessions=min(config.sessions, written),
                      recovery_codes=10 * written if config.recovery_codes else 0,
                      seconds=time.perf_counter() - started,
                      backend="sqlite" if settings.is_sqlite else "postgresql", prefix=prefix)
