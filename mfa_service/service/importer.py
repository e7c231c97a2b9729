"""``mfa-service import``: users' existing factors brought in from another system, ACTIVE
and established, usable at once (docs/OPERATIONS.md, "Importing existing factors").

Each line is read and checked by service/import_lines.py (pure). Here, per batch of lines:

1. *parse* (in worker processes) and *prepare* (here), while the database writes the batch
   before: a factor id, and the app's secret encrypted exactly as Enroll encrypts it
   (AES-256-GCM under the keyring's primary key, ``factors.totp.secret_aad``: the factor
   and user ids);
2. *decide* (``decide``, pure): under the users' locks, against their live factors, the
   rules Enroll keeps: one ACTIVE factor per method (passkeys are not imported), at most
   MFA_MAX_FACTORS_PER_USER live factors. A line whose factor the user already has is
   *skipped*; one that would break a rule is *refused*, saying which;
3. *write* (store/bulk.py): the factors, the recovery-code factor of a user who had none
   (the service keeps one beside every ACTIVE factor: service/recovery.py; it holds no
   codes until the user regenerates them), and one ``factor_imported`` audit row per
   imported factor, in one transaction. A batch that the database refuses is written
   again one line per transaction, so only the line at fault is refused.

"Already present" (skipped, so a re-run imports nothing): the user has an ACTIVE factor
of the same method that is the same factor: for email the same address (letter case
ignored, as the send limits count it), for phone the same E.164 number, for an app the
same secret and the same TOTP parameters. The same user and method with another address,
number or secret is refused: the file and the service disagree, and an operator decides.

An imported factor is *established* from ``confirmed_at`` (else the import): it is the
user's existing factor, not one an attacker just added (docs/SECURITY.md). No notices are
sent: nothing changed for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import multiprocessing
import os
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, NamedTuple

from mfa_service.clock import Clock
from mfa_service.crypto import DecryptionError, Keyring
from mfa_service.domain import DEFAULT_TOTP, AuditContext, FactorStatus, Method
from mfa_service.errors import DeadlineExceeded, MfaError, StoreConflict, StoreUnavailable
from mfa_service.factors.totp import secret_aad
from mfa_service.service import audit
from mfa_service.service.import_lines import (
    ImportLine,
    LineRefused,
    parse_lines,
    parse_lines_packed,
    unpack,
)
from mfa_service.service.rules import new_id
from mfa_service.store import bulk
from mfa_service.store.bulk import LiveFactor
from mfa_service.store.database import Database

log = logging.getLogger("mfa_service.importer")

WHO = AuditContext(caller="import-cli")
DEFAULT_BATCH = 1000
MAX_BATCH = 10_000
MAX_LINE_BYTES = 64 * 1024  # an otpauth URI with a 1024-bit secret is under 1 KiB
YIELD_EVERY = 32  # lines worked on between two turns of the event loop (under a ms)
MAX_WORKERS = 16
SHARDS = 2  # transactions a batch is written as, at once (the store's pool holds two)
RECOVERY_LABEL = "recovery codes"  # as service/recovery.py labels that factor
_NOUNS = {Method.EMAIL: "address", Method.PHONE: "number",
          Method.AUTHENTICATOR_APP: "secret or TOTP parameters"}


class Prepared(NamedTuple):
    """A line made into the row it would be: ACTIVE, its secret encrypted."""

    line: ImportLine
    live: LiveFactor  # as the rules will see it once written
    row: tuple[Any, ...]  # store/bulk.py: factor_row


@dataclass
class Decision:
    """What one batch comes to."""

    imported: list[Prepared] = field(default_factory=list)
    # The rows to insert: the imported factors and the recovery-code factors made for
    # users who had none.
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    added: list[LiveFactor] = field(default_factory=list)  # the same rows, as the rules see
    # imported factor id -> the recovery-code factor made with it (the user had none)
    recovery_of: dict[str, str] = field(default_factory=dict)
    skipped: list[ImportLine] = field(default_factory=list)  # already present
    refused: list[LineRefused] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return len(self.imported) + len(self.skipped) + len(self.refused)

    def add(self, other: Decision) -> None:
        self.imported += other.imported
        self.rows += other.rows
        self.added += other.added
        self.recovery_of.update(other.recovery_of)
        self.skipped += other.skipped
        self.refused += other.refused


_ACTIVE = FactorStatus.ACTIVE.value
_RECOVERY = Method.RECOVERY_CODE.value


def prepare(line: ImportLine, keyring: Keyring, now: datetime, *, locale: str,
            make_id: Callable[[], str] = new_id) -> Prepared:
    """``line`` as an ACTIVE factor, established from ``confirmed_at`` (else ``now``)."""
    factor_id = make_id()
    since = line.confirmed_at or now
    key_id, ciphertext = (None, None)
    if line.secret is not None:
        key_id, ciphertext = keyring.encrypt(line.secret, secret_aad(factor_id, line.user_id))
    method, totp = line.method.value, line.totp
    default = totp is DEFAULT_TOTP
    return Prepared(line, LiveFactor(
        factor_id, line.user_id, method, _ACTIVE, line.destination, ciphertext, key_id,
        None if default else totp.algorithm.value, None if default else totp.digits,
        None if default else totp.period), bulk.factor_row(
        factor_id=factor_id, user_id=line.user_id, method=method, status=_ACTIVE,
        label=line.label, masked_destination=line.masked, destination=line.destination,
        secret_ciphertext=ciphertext, secret_key_id=key_id, created_at=since,
        confirmed_at=since, last_used_at=None, established_at=since, locale=locale,
        totp=totp))


def recovery_factor(user_id: str, now: datetime, make_id: Callable[[], str] = new_id,
                    ) -> tuple[LiveFactor, tuple[Any, ...]]:
    """The recovery-code factor Recovery.issue_first makes with a user's first ACTIVE
    factor, without codes: nobody could be shown them (the user regenerates them, with a
    proof from the imported factor, which is established)."""
    factor_id = make_id()
    return (LiveFactor(factor_id, user_id, _RECOVERY, _ACTIVE, None, None, None, None, None,
                       None),
            bulk.factor_row(factor_id=factor_id, user_id=user_id, method=_RECOVERY,
                            status=_ACTIVE, label=RECOVERY_LABEL,
                            masked_destination=RECOVERY_LABEL, destination=None,
                            secret_ciphertext=None, secret_key_id=None, created_at=now,
                            confirmed_at=now, last_used_at=now, established_at=now,
                            locale="en"))


def equivalent(held: LiveFactor, line: ImportLine,
               secret_of: Callable[[LiveFactor], bytes | None]) -> bool:
    """Whether ``held`` (ACTIVE, of the line's method) is the factor ``line`` asks for."""
    if line.method is Method.AUTHENTICATOR_APP:
        if held.totp != line.totp or line.secret is None:
            return False
        secret = secret_of(held)
        return secret is not None and hmac.compare_digest(secret, line.secret)
    if held.destination is None or line.destination is None:
        return False
    if line.method is Method.EMAIL:
        return held.destination.casefold() == line.destination.casefold()
    return held.destination == line.destination


def decide(batch: Iterable[Prepared], present: Mapping[str, Sequence[LiveFactor]], *,
           max_factors: int, secret_of: Callable[[LiveFactor], bytes | None],
           new_recovery: Callable[[str], tuple[LiveFactor, tuple[Any, ...]]]) -> Decision:
    """Enroll's rules for each line in order, against the users' live factors
    (``present``: PENDING and ACTIVE) and the lines accepted before it."""
    held = {user: list(factors) for user, factors in present.items()}
    out = Decision()
    for p in batch:
        line = p.line
        method = p.live.method
        mine = held.setdefault(line.user_id, [])
        active = [f for f in mine if f.status == _ACTIVE and f.method == method]
        if active:
            if any(equivalent(f, line, secret_of) for f in active):
                out.skipped.append(line)
            else:
                out.refused.append(LineRefused(
                    line.line, f"the user already has an active {method} factor "
                    f"with another {_NOUNS[line.method]} (disable it first)",
                    line.user_id, _shown(line)))
            continue
        if len(mine) >= max_factors:
            out.refused.append(LineRefused(
                line.line, f"the user has {len(mine)} factors, the most "
                f"MFA_MAX_FACTORS_PER_USER ({max_factors}) allows", line.user_id, _shown(line)))
            continue
        mine.append(p.live)
        out.imported.append(p)
        out.rows.append(p.row)
        out.added.append(p.live)
        if not any(f.method == _RECOVERY and f.status == _ACTIVE for f in mine):
            recovery, row = new_recovery(line.user_id)
            mine.append(recovery)
            out.rows.append(row)
            out.added.append(recovery)
            out.recovery_of[p.live.factor_id] = recovery.factor_id
    return out


def _shown(line: ImportLine) -> str | None:
    """What a refusal may show of the factor: the masked address or number (an app's
    name is the user's account name, and says nothing the line number does not)."""
    return line.masked if line.method in (Method.EMAIL, Method.PHONE) else None


@dataclass
class ImportReport:
    """What a run did (or, ``dry_run``, would do)."""

    run_id: str
    dry_run: bool
    lines: int = 0  # lines read that were not blank
    imported: Counter[Method] = field(default_factory=Counter)
    skipped: int = 0
    refused: list[LineRefused] = field(default_factory=list)
    bytes_read: int = 0
    # Set when the database went away mid-run: what was committed stays (a re-run skips
    # it), the rest of the file was not read.
    stopped: str | None = None
    seconds: float = 0.0  # from the first line read to the last batch committed

    @property
    def imported_total(self) -> int:
        return sum(self.imported.values())

    def add(self, decision: Decision) -> None:
        self.imported.update(p.line.method for p in decision.imported)
        self.skipped += len(decision.skipped)
        self.refused += decision.refused


class _Stopped(Exception):
    """The database went away while a batch was written: what was written of it (other
    shards), and the first line not written."""

    def __init__(self, cause: MfaError, done: Decision, first_line: int) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.done = done
        self.first_line = first_line


class FreshIds:
    """Random (version 4) UUIDs as text, like ``rules.new_id``, a thousand at a time:
    one system call for all their randomness instead of one each, and no UUID object
    (together a sixth of what a line cost the importer's busiest process)."""

    def __init__(self, chunk: int = 1024) -> None:
        self._chunk = chunk
        self._ready: list[str] = []

    def __call__(self) -> str:
        if not self._ready:
            self._ready = self._make(self._chunk)
        return self._ready.pop()

    @staticmethod
    def _make(count: int) -> list[str]:
        raw = bytearray(os.urandom(16 * count))
        for i in range(0, 16 * count, 16):
            raw[i + 6] = raw[i + 6] & 0x0F | 0x40  # version 4 (RFC 9562 section 5.4)
            raw[i + 8] = raw[i + 8] & 0x3F | 0x80  # the RFC's variant
        h = raw.hex()
        return [f"{h[j:j + 8]}-{h[j + 8:j + 12]}-{h[j + 12:j + 16]}-{h[j + 16:j + 20]}-"
                f"{h[j + 20:j + 32]}" for j in range(0, 32 * count, 32)]


@dataclass(frozen=True)
class _Raw:
    """Lines as read from the file, not parsed yet."""

    lines: list[tuple[int, bytes]]  # (line number, bytes)
    too_long: list[LineRefused]
    bytes_read: int
    last_line: int
    eof: bool


@dataclass(frozen=True)
class _Chunk:
    prepared: list[Prepared]
    refused: list[LineRefused]
    lines: int  # non-blank lines in it
    bytes_read: int
    last_line: int


def default_workers() -> int:
    """Parsing processes: every core but one (the event loop's, and PostgreSQL's share),
    at least one, at most four (beyond that the single writer is the limit)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class Parsers:
    """Processes that parse lines (service/import_lines.py), started at once: each is a
    fresh interpreter (spawn; a fork would copy this process's connections and threads)
    that imports the parsing module, a good half second, so whoever makes them does so
    before its own slow start (the keyring, the database) to overlap the two."""

    def __init__(self, count: int) -> None:
        if not 1 <= count <= MAX_WORKERS:
            raise ValueError(f"workers must be 1-{MAX_WORKERS}")
        self.count = count
        self._pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(count):  # each submission starts a process that imports the parser
            self._pool.submit(parse_lines_packed, [], datetime.now(UTC))

    async def parse(self, lines: list[tuple[int, bytes]],
                    now: datetime) -> list[ImportLine | LineRefused]:
        """``parse_lines``, shared among the processes; the order is kept."""
        loop = asyncio.get_running_loop()
        share = -(-len(lines) // self.count) or 1
        parts = await asyncio.gather(*(
            loop.run_in_executor(self._pool, parse_lines_packed, lines[i:i + share], now)
            for i in range(0, len(lines), share)))
        return [unpack(packed) for part in parts for packed in part]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Parsers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Importer:
    """One run over one file, batch after batch."""

    def __init__(self, db: Database, keyring: Keyring, clock: Clock, *, max_factors: int,
                 default_locale: str = "en", batch: int = DEFAULT_BATCH,
                 dry_run: bool = False, parsers: Parsers | None = None,
                 make_id: Callable[[], str] | None = None) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}")
        self._db = db
        self._keyring = keyring
        self._clock = clock
        self._max_factors = max_factors
        self._locale = default_locale
        self._batch = batch
        self._dry_run = dry_run
        self._parsers = parsers
        self._make_id = make_id or FreshIds()
        # Secrets of the apps this run planned and has not written (dry run: every one),
        # so a later line compares with them without a store to decrypt from.
        self._planned_secrets: dict[str, bytes] = {}
        self._planned: dict[str, list[LiveFactor]] = {}  # dry run: by user
        self._run_id = ""

    async def run(self, source: BinaryIO,
                  progress: Callable[[ImportReport], None] | None = None) -> ImportReport:
        """Import every line of ``source``; ``progress`` hears of each batch done.

        A pipeline, so the file's lines, the CPU and the database are all busy at once:
        batch k+1 is parsed (by ``parsers``' processes; with none, in turns with the
        rest), batch k encrypted and decided here, and batch k-1 written, each while the
        others run. Batches are written one after another, in file order, so a line
        always sees what the lines before it did."""
        self._run_id = str(uuid.uuid4())  # in every audit row of the run: find them all
        report = ImportReport(run_id=self._run_id, dry_run=self._dry_run)
        started = time.monotonic()
        raw = self._read(source, 0)
        parsing = asyncio.create_task(self._parse(raw))
        following: asyncio.Task[list[ImportLine | LineRefused]] | None = None
        writing: asyncio.Task[Decision] | None = None
        written: _Chunk | None = None  # what ``writing`` writes
        try:
            while True:
                following = None
                if not raw.eof:
                    after = self._read(source, raw.last_line)
                    following = asyncio.create_task(self._parse(after))
                chunk = await self._prepare(raw, await parsing)
                if writing is not None and written is not None and not await self._settle(
                        writing, written, report, progress):
                    writing = None
                    break
                writing, written = asyncio.create_task(self._write(chunk.prepared)), chunk
                if following is None:
                    break
                raw, parsing = after, following
            if writing is not None and written is not None:
                await self._settle(writing, written, report, progress)
                writing = None
        finally:
            for task in (following, writing):
                if task is not None and not task.done():  # interrupted: roll it back
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        report.refused.sort(key=lambda r: r.line)
        report.seconds = time.monotonic() - started
        log.info("import %s", "checked (dry run)" if self._dry_run else "finished", extra={
            "run": report.run_id, "lines": report.lines, "imported": report.imported_total,
            "skipped": report.skipped, "refused": len(report.refused),
            "stopped": report.stopped is not None})
        return report

    async def _settle(self, writing: asyncio.Task[Decision], chunk: _Chunk,
                      report: ImportReport,
                      progress: Callable[[ImportReport], None] | None) -> bool:
        """Wait for a batch to be written and count it; False when the database went
        away (``report.stopped`` says where)."""
        try:
            decision = await writing
        except _Stopped as stop:
            report.lines += stop.done.lines + len(chunk.refused)
            report.refused += chunk.refused
            report.add(stop.done)
            report.stopped = (f"{stop.cause.message}: stopped at line {stop.first_line}; "
                              "what was imported before stays, and a run again skips it")
            return False
        report.lines += chunk.lines
        report.bytes_read += chunk.bytes_read
        report.refused += chunk.refused
        report.add(decision)
        if progress is not None:
            progress(report)
        return True

    # -- reading -----------------------------------------------------------------------------
    def _read(self, source: BinaryIO, after_line: int) -> _Raw:
        """The next ``batch`` lines of the file, as bytes."""
        lines: list[tuple[int, bytes]] = []
        too_long: list[LineRefused] = []
        number, size, eof = after_line, 0, False
        while len(lines) + len(too_long) < self._batch:
            raw = source.readline(MAX_LINE_BYTES + 1)
            if not raw:
                eof = True
                break
            number += 1
            size += len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size += _skip_rest_of_line(source)
                too_long.append(LineRefused(number, f"longer than {MAX_LINE_BYTES} bytes"))
            else:
                lines.append((number, raw))
        return _Raw(lines, too_long, size, number, eof)

    async def _parse(self, raw: _Raw) -> list[ImportLine | LineRefused]:
        """Each line read (service/import_lines.py), blank ones left out."""
        now = self._clock.now()
        if self._parsers is not None:
            return await self._parsers.parse(raw.lines, now)
        parsed: list[ImportLine | LineRefused] = []
        for start in range(0, len(raw.lines), YIELD_EVERY):
            parsed += parse_lines(raw.lines[start:start + YIELD_EVERY], now)
            await asyncio.sleep(0)  # the batch being written gets its turn
        return parsed

    async def _prepare(self, raw: _Raw, parsed: list[ImportLine | LineRefused]) -> _Chunk:
        """The good lines as rows (ids, secrets encrypted); the others refused."""
        now = self._clock.now()
        prepared: list[Prepared] = []
        refused = list(raw.too_long)
        for i, line in enumerate(parsed):
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if isinstance(line, LineRefused):
                refused.append(line)
            else:
                prepared.append(prepare(line, self._keyring, now, locale=self._locale,
                                        make_id=self._make_id))
        return _Chunk(prepared, refused, len(parsed) + len(raw.too_long), raw.bytes_read,
                      raw.last_line)

    # -- writing -----------------------------------------------------------------------------
    async def _write(self, batch: list[Prepared]) -> Decision:
        """Write a batch as ``SHARDS`` transactions at once, each on its own connection,
        its users chosen by a hash of their id: no two share a user, so none waits for
        another's locks, and each user's lines stay in file order. (One transaction at a
        time left both cores idle for a third of the run: each waited on its round trips.)
        A shard the database could not take stops the run (``_Stopped``) with what the
        others did."""
        shards: list[list[Prepared]] = [[] for _ in range(SHARDS)]
        for p in batch:
            shards[zlib.crc32(p.line.user_id.encode()) % SHARDS].append(p)
        results = await asyncio.gather(*(self._write_shard(shard) for shard in shards),
                                       return_exceptions=True)
        out = Decision()
        stopped: tuple[MfaError, int] | None = None
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, StoreUnavailable | DeadlineExceeded):
                first = min(p.line.line for p in shard)
                if stopped is None or first < stopped[1]:
                    stopped = (result, first)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.add(result)
        if stopped is not None:
            raise _Stopped(stopped[0], out, stopped[1])
        return out

    async def _write_shard(self, batch: list[Prepared]) -> Decision:
        if not batch:
            return Decision()
        try:
            return await self._commit(batch)
        except (StoreConflict, bulk.RowRefused):
            if len(batch) == 1:
                raise
        # One line of the batch broke it (or something wrote these users meanwhile):
        # each line on its own, so only the one at fault is refused.
        out = Decision()
        for p in batch:
            try:
                out.add(await self._commit([p]))
            except bulk.RowRefused as exc:
                out.refused.append(LineRefused(
                    p.line.line, f"the database refused it ({exc.what})", p.line.user_id,
                    _shown(p.line)))
            except StoreConflict:
                out.refused.append(LineRefused(
                    p.line.line, "the database refused it (a constraint, or a change made "
                    "meanwhile: a run again retries it)", p.line.user_id, _shown(p.line)))
        return out

    async def _commit(self, batch: list[Prepared]) -> Decision:
        users = sorted({p.line.user_id for p in batch})
        now = self._clock.now()
        if self._dry_run:
            async with self._db.transaction(readonly=True) as tx:
                present = await bulk.live_factors(tx, users)
            for user in users:  # what earlier batches would have written
                present[user] = present[user] + self._planned.get(user, [])
            decision = self._decide(batch, present, now)
            for live in decision.added:
                self._planned.setdefault(live.user_id, []).append(live)
            return decision
        async with self._db.transaction() as tx:
            await bulk.lock_users(tx, users)
            present = await bulk.live_factors(tx, users)
            decision = self._decide(batch, present, now)
            await bulk.insert_factors(tx, decision.rows)
            row_of = bulk.audit_rows_of(
                audit.event_row(now, audit.Event.IMPORTED, audit.Outcome.OK, WHO))
            await bulk.insert_audit(tx, [self._audit_row(p, decision, row_of)
                                         for p in decision.imported])
        return decision

    def _decide(self, batch: list[Prepared], present: Mapping[str, Sequence[LiveFactor]],
                now: datetime) -> Decision:
        # Lines of this batch compare with each other by the secrets they carry.
        ids = [p.live.factor_id for p in batch]
        self._planned_secrets.update(
            (p.live.factor_id, p.line.secret) for p in batch if p.line.secret is not None)
        decision = None
        try:
            decision = decide(batch, present, max_factors=self._max_factors,
                              secret_of=self._secret_of,
                              new_recovery=lambda user: recovery_factor(user, now,
                                                                        self._make_id))
            return decision
        finally:
            # Kept only where no store holds them: the apps a dry run would import.
            kept = ({p.live.factor_id for p in decision.imported}
                    if self._dry_run and decision is not None else set())
            for factor_id in ids:
                if factor_id not in kept:
                    self._planned_secrets.pop(factor_id, None)

    def _secret_of(self, held: LiveFactor) -> bytes | None:
        """An ACTIVE app's secret: planned by this run, else decrypted from the store."""
        planned = self._planned_secrets.get(held.factor_id)
        if planned is not None:
            return planned
        if held.secret_ciphertext is None or held.secret_key_id is None:
            return None
        try:
            return self._keyring.decrypt(held.secret_key_id, held.secret_ciphertext,
                                         secret_aad(held.factor_id, held.user_id))
        except DecryptionError:
            return None  # a key the keyring lacks: not provably the same, so refused

    def _audit_row(self, p: Prepared, decision: Decision,
                   row_of: Callable[[str, str, str], tuple[Any, ...]]) -> tuple[Any, ...]:
        """The ``factor_imported`` row (``row_of``: the batch's, store/bulk.py): detail
        method, line, run; an app's TOTP parameters, a phone's channel, the
        recovery-code factor made with it."""
        line, factor_id = p.line, p.live.factor_id
        # The detail's JSON written directly (a fifth of json.dumps' cost, at 100,000 rows
        # a run): every value is an enum value, a number or a UUID, none needs escaping.
        detail = [f'"method": "{line.method.value}", "line": {line.line}, '
                  f'"run": "{self._run_id}"']
        if line.method is Method.AUTHENTICATOR_APP:
            t = line.totp
            detail.append(f'"algorithm": "{t.algorithm.value}", "digits": {t.digits}, '
                          f'"period": {t.period}')
        if line.channel is not None:
            detail.append(f'"channel": "{line.channel.value}"')
        recovery = decision.recovery_of.get(factor_id)
        if recovery is not None:
            detail.append(f'"recovery_factor_id": "{recovery}"')
        return row_of(line.user_id, factor_id, "{" + ", ".join(detail) + "}")


def _skip_rest_of_line(source: BinaryIO) -> int:
    skipped = 0
    while True:
        part = source.readline(MAX_LINE_BYTES)
        skipped += len(part)
        if not part or part.endswith(b"\n"):
            return skipped
