"""Operator rules: key rotation and key status, the support desk's user reset, the audit
trail. Used by ``mfa-service keys|admin|audit`` (mfa_service.cli_admin), while servers
keep serving the same database.

Each unit of work is one transaction of its own, and every write is conditional on the
row still being what was read, so a request that changes a row meanwhile always wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from mfa_service.clock import Clock
from mfa_service.crypto import DecryptionError, Keyring
from mfa_service.delivery.outbox import payload_aad
from mfa_service.domain import AuditContext, AuditEvent, Method, NoticeKind
from mfa_service.errors import InvalidArgument
from mfa_service.factors.passkey import credential_aad
from mfa_service.factors.totp import secret_aad
from mfa_service.service import audit
from mfa_service.service.notices import Notifier
from mfa_service.store import maintenance
from mfa_service.store.database import Database
from mfa_service.store.maintenance import StoredCiphertext
from mfa_service.store.unit import Unit

WHO = AuditContext(caller="admin-cli")
MAX_USER_ID = 128  # the column width, and what the RPCs accept
MAX_REASON = 500
MAX_BATCH = 10_000
MAX_AUDIT_LIMIT = 10_000


def _factor_secret_aad(row: StoredCiphertext) -> bytes:
    """The associated data the factor's own method bound its ciphertext with."""
    if row.kind == Method.PASSKEY.value:
        return credential_aad(row.row_id, row.user_id)
    return secret_aad(row.row_id, row.user_id)


def check_user_id(user_id: str) -> str:
    """The RPCs' rule for a user id (1-128 printable characters, no outer spaces)."""
    if not user_id or len(user_id) > MAX_USER_ID or not user_id.isprintable() \
            or user_id != user_id.strip():
        raise InvalidArgument.single(
            "user_id", f"must be 1-{MAX_USER_ID} printable characters without outer spaces")
    return user_id


def check_reason(reason: str) -> str:
    """A reset must say why (it is the audit trail's only account of the decision)."""
    reason = reason.strip()
    if not 1 <= len(reason) <= MAX_REASON or not reason.isprintable():
        raise InvalidArgument.single(
            "reason", f"must be 1-{MAX_REASON} printable characters on one line")
    return reason


# -- key rotation --------------------------------------------------------------------------
@dataclass
class RotationCounts:
    """What happened to the rows of one kind of ciphertext in a rotation run."""

    rekeyed: int = 0
    skipped: int = 0  # changed by a request between listing and updating (not an error)
    failed: int = 0  # could not be decrypted: unknown key id or a corrupt ciphertext

    @property
    def examined(self) -> int:
        return self.rekeyed + self.skipped + self.failed


@dataclass
class RotationReport:
    primary_id: str
    factor_secrets: RotationCounts = field(default_factory=RotationCounts)
    outbox_payloads: RotationCounts = field(default_factory=RotationCounts)
    failures: list[str] = field(default_factory=list)  # "table id: reason", never a secret

    @property
    def ok(self) -> bool:
        return not self.failures


class _Lister(Protocol):
    async def __call__(self, unit: Unit, primary_id: str, *, after: str | None,
                       limit: int) -> list[StoredCiphertext]: ...


class _Rewriter(Protocol):
    async def __call__(self, unit: Unit, old: StoredCiphertext, key_id: str,
                       blob: bytes) -> bool: ...


class _Aad(Protocol):
    def __call__(self, row: StoredCiphertext) -> bytes: ...


# -- key status ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyUsage:
    """How many stored values still need one key id."""

    key_id: str
    in_keyring: bool
    counts: dict[str, int]  # maintenance.KEY_USES -> rows

    @property
    def encrypted(self) -> int:
        """AES-GCM ciphertexts: `keys rotate` moves them to the primary key."""
        return self.counts[maintenance.FACTOR_SECRETS] + self.counts[maintenance.OUTBOX_PAYLOADS]

    @property
    def hashed(self) -> int:
        """HMACs: they cannot be re-keyed without the plaintext, which is never stored;
        they stop needing the key when they expire, are used or are regenerated."""
        return (self.counts[maintenance.LIVE_SESSIONS] + self.counts[maintenance.RECOVERY_CODES]
                + self.counts[maintenance.OPEN_CHALLENGES]
                + self.counts[maintenance.TRUSTED_DEVICES])

    @property
    def total(self) -> int:
        return self.encrypted + self.hashed


@dataclass(frozen=True)
class KeyStatus:
    primary_id: str
    keys: list[KeyUsage]  # the keyring's keys in keyring order, then unknown ones

    @property
    def still_needed(self) -> list[KeyUsage]:
        return [k for k in self.keys if k.in_keyring and k.key_id != self.primary_id
                and k.total]

    @property
    def removable(self) -> list[KeyUsage]:
        return [k for k in self.keys if k.in_keyring and k.key_id != self.primary_id
                and not k.total]

    @property
    def unknown(self) -> list[KeyUsage]:
        """Key ids the database needs but the keyring lacks: those values are unusable."""
        return [k for k in self.keys if not k.in_keyring]

    @property
    def ok(self) -> bool:
        return not self.unknown


# -- user reset ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ResetReport:
    user_id: str
    lockout_cleared: bool
    factors_disabled: int
    recovery_codes_retired: int
    sessions_revoked: int
    challenges_closed: int
    devices_forgotten: int = 0

    @property
    def nothing_done(self) -> bool:
        return not (self.lockout_cleared or self.factors_disabled
                    or self.recovery_codes_retired or self.sessions_revoked
                    or self.challenges_closed or self.devices_forgotten)


class AdminService:
    """The operator commands' rules over one Database; the clock decides "now" (what is
    live, what expired) exactly as the servers' clock does."""

    def __init__(self, db: Database, clock: Clock, notifier: Notifier | None = None) -> None:
        self._db = db
        self._clock = clock
        # Tells the user of a reset (NIST SP 800-63B-4: the subscriber is notified of an
        # account recovery); None only where nothing can be sent (tests of other commands).
        self._notifier = notifier

    # -- keys ------------------------------------------------------------------------------
    async def rotate_keys(self, keyring: Keyring, *, batch: int = 100) -> RotationReport:
        """Re-encrypt every stored ciphertext that is not under the primary key.

        Only AES-GCM ciphertexts can be moved: TOTP secrets, passkey credentials and
        pending outbox bodies.
        Each row is rewritten in its own short transaction, guarded by a conditional
        UPDATE, so a server disabling a factor or sending a message meanwhile is never
        overwritten (the row is counted as skipped). Idempotent: a second run finds
        nothing to do and writes nothing, not even an audit event.

        Every server must already have the primary key in its keyring (as primary or
        not) before this runs, or they could not read what it writes.
        """
        if not 1 <= batch <= MAX_BATCH:
            raise InvalidArgument.single("batch", f"must be 1-{MAX_BATCH}")
        report = RotationReport(primary_id=keyring.primary_id)
        await self._rotate(keyring, batch, report, report.factor_secrets, "factors",
                           maintenance.factor_secrets_to_rekey,
                           maintenance.rekey_factor_secret,
                           _factor_secret_aad)
        await self._rotate(keyring, batch, report, report.outbox_payloads, "outbox",
                           maintenance.outbox_payloads_to_rekey,
                           maintenance.rekey_outbox_payload,
                           lambda row: payload_aad(row.row_id))
        if report.factor_secrets.examined or report.outbox_payloads.examined:
            now = self._clock.now()
            async with self._db.transaction() as tx:
                audit.record(
                    tx, now, audit.Event.KEYS_ROTATED,
                    audit.Outcome.OK if report.ok else audit.Outcome.INCOMPLETE, WHO,
                    detail={"primary_key_id": report.primary_id,
                            "factor_secrets_rekeyed": report.factor_secrets.rekeyed,
                            "outbox_payloads_rekeyed": report.outbox_payloads.rekeyed,
                            "skipped": report.factor_secrets.skipped
                            + report.outbox_payloads.skipped,
                            "failed": len(report.failures)})
        return report

    async def _rotate(self, keyring: Keyring, batch: int, report: RotationReport,
                      counts: RotationCounts, table: str, list_rows: _Lister,
                      rewrite: _Rewriter, aad: _Aad) -> None:
        after: str | None = None
        while True:
            # Listed in a short transaction of its own: no lock is held while we work.
            async with self._db.transaction() as tx:
                rows = await list_rows(tx, keyring.primary_id, after=after, limit=batch)
            for row in rows:
                try:
                    plaintext = keyring.decrypt(row.key_id, row.blob, aad(row))
                except DecryptionError as exc:
                    counts.failed += 1
                    report.failures.append(f"{table} {row.row_id} (key {row.key_id}): {exc}")
                    continue
                key_id, blob = keyring.encrypt(plaintext, aad(row))
                async with self._db.transaction() as tx:
                    done = await rewrite(tx, row, key_id, blob)
                if done:
                    counts.rekeyed += 1
                else:
                    counts.skipped += 1
            if len(rows) < batch:
                return
            after = rows[-1].row_id

    async def key_status(self, keyring: Keyring) -> KeyStatus:
        """Per key id, the stored values that still need it (read in one transaction)."""
        now = self._clock.now()
        async with self._db.transaction() as tx:
            usage = await maintenance.key_usage(tx, now)
        found = {kid for by_key in usage.values() for kid in by_key}
        ordered = keyring.key_ids + sorted(found - set(keyring.key_ids))
        return KeyStatus(primary_id=keyring.primary_id, keys=[
            KeyUsage(kid, kid in keyring.key_ids,
                     {use: usage[use].get(kid, 0) for use in maintenance.KEY_USES})
            for kid in ordered])

    # -- support desk ----------------------------------------------------------------------
    async def reset_user(self, user_id: str, reason: str) -> ResetReport:
        """Take away every second factor of a user, in one transaction.

        For the support desk when a user lost every factor, or one was compromised: the
        user can enrol afresh and nothing old (factor, recovery code, session, pending
        code, lockout) survives. Audited even when there was nothing to reset, as the
        attempt itself is a support-desk action on that user.
        """
        user_id, reason = check_user_id(user_id), check_reason(reason)
        now = self._clock.now()
        async with self._db.transaction() as tx:
            # The lockout row first: Verify locks it before anything else, same order here.
            lockout_cleared = await maintenance.clear_lockout(tx, user_id)
            # Before the factors go: the notice goes to every address and number the user
            # could receive it on, so a reset they did not ask for is noticed.
            notified = (await self._notifier.notify(tx, now, user_id,
                                                    NoticeKind.SECOND_FACTOR_RESET, who=WHO)
                        if self._notifier is not None else 0)
            factors_disabled = await maintenance.disable_user_factors(tx, user_id, now)
            codes_retired = await maintenance.retire_recovery_codes(tx, user_id, now)
            # No remembered browser logs in without a code after a reset.
            devices_forgotten = await maintenance.forget_user_devices(tx, user_id, now)
            sessions_revoked = await maintenance.revoke_user_sessions(tx, user_id, now)
            challenges_closed = await maintenance.close_open_challenges(tx, user_id)
            report = ResetReport(user_id, lockout_cleared, factors_disabled, codes_retired,
                                 sessions_revoked, challenges_closed, devices_forgotten)
            audit.record(
                tx, now, audit.Event.ADMIN_RESET,
                audit.Outcome.NOTHING_TO_RESET if report.nothing_done else audit.Outcome.OK,
                WHO, user_id=user_id,
                detail={"reason": reason, "factors_disabled": report.factors_disabled,
                        "sessions_revoked": report.sessions_revoked,
                        "recovery_codes_retired": report.recovery_codes_retired,
                        "challenges_closed": report.challenges_closed,
                        "devices_forgotten": report.devices_forgotten,
                        "lockout_cleared": int(report.lockout_cleared),
                        "notices": notified})
        return report

    async def audit_trail(self, user_id: str, *, since: datetime | None = None,
                          until: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        """A user's events, newest first: ``since`` inclusive, ``until`` exclusive."""
        user_id = check_user_id(user_id)
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidArgument.single("limit", f"must be 1-{MAX_AUDIT_LIMIT}")
        if since is not None and until is not None and since >= until:
            raise InvalidArgument.single("since", "must be before until")
        async with self._db.transaction() as tx:
            return await tx.audit.page(user_id, start=since, end=until, limit=limit)
