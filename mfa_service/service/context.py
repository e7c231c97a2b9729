"""What every use case of the service layer shares: the rules, the collaborators, and the
checks more than one RPC makes.

The use cases (one module each): enrolment.py (Enroll), challenges.py (Challenge),
verification.py (Verify, Disable: a table of purpose handlers), recovery.py (recovery
codes), profile.py (ListFactors, ListAuditEvents), sessions.py (CheckSession,
RevokeSession). Each call is one transaction that first takes the user's lock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.domain import (
    Application,
    AuditContext,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    Purpose,
)
from mfa_service.errors import FactorNotFound, FailedPrecondition, MfaError, ResourceExhausted
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service import audit
from mfa_service.service.limits import LockoutPolicy, PhoneSendRefused, SendPermit, SendQuota
from mfa_service.service.notices import Notifier
from mfa_service.service.policy import Evidence
from mfa_service.service.sessions import SessionService
from mfa_service.store.database import Database, Transaction
from mfa_service.store.security import LockoutState

log = logging.getLogger("mfa_service.limits")


@dataclass(frozen=True)
class Rules:
    """The limits (docs/API.md, docs/SECURITY.md), already bounded by Settings."""

    code_ttl: timedelta = timedelta(minutes=5)
    max_attempts: int = 5
    max_factors_per_user: int = 20
    resend_cooldown: timedelta = timedelta(seconds=30)
    max_sends: int = 10
    send_window: timedelta = timedelta(minutes=10)
    max_sends_per_destination: int = 5
    # Phone codes across users (SMS pumping, toll fraud; settings.py says why these).
    max_sends_per_phone_prefix: int = 30  # an hour, to the numbers of one range
    max_sends_per_phone_country: int = 1000  # an hour, to the numbers of one country
    phone_daily_budget: int = 10_000  # a UTC day, SMS and voice together
    change_proof_max_age: timedelta = timedelta(minutes=10)
    product: str = "Cloud Platform"
    default_locale: str = "en"
    recent_session: timedelta = timedelta(minutes=10)
    pending_ttl: timedelta = timedelta(minutes=15)
    new_credential_hold: timedelta = timedelta(hours=24)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Context:
    """The collaborators of every use case (built once, in app.create_server)."""

    db: Database
    registry: FactorRegistry
    keyring: Keyring
    clock: Clock
    sessions: SessionService
    notifier: Notifier
    rules: Rules = field(default_factory=Rules)
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    new_id: Callable[[], str] = new_id

    @property
    def quota(self) -> SendQuota:
        r = self.rules
        return SendQuota(cooldown=r.resend_cooldown, window=r.send_window,
                         per_user_method=r.max_sends, per_destination=r.max_sends_per_destination,
                         per_phone_prefix=r.max_sends_per_phone_prefix,
                         per_phone_country=r.max_sends_per_phone_country,
                         phone_daily_budget=r.phone_daily_budget)

    async def check_sends(self, tx: Transaction, now: datetime, *, user_id: str,
                          method: Method, factor_id: str | None,
                          destination: str) -> SendPermit:
        """The send quota (service/limits.py) for a code about to go to ``destination``."""
        return await self.quota.check(tx, now, user_id=user_id, method=method,
                                      factor_id=factor_id, destination=destination,
                                      keyring=self.keyring)

    async def record_send_refusal(self, refusal: PhoneSendRefused, who: AuditContext, *,
                                  user_id: str, factor_id: str | None,
                                  application: Application) -> None:
        """Audit (and so count in the metrics) and log a phone code refused by a cap
        across users, in a transaction of its own: the refused one rolled back, and
        nothing else changed. A failure here never hides the refusal itself."""
        now = self.clock.now()
        detail: dict[str, str | int] = {"limit": refusal.limit, "method": Method.PHONE.value,
                                        "region": refusal.region}
        try:
            async with self.db.transaction() as tx:
                audit.record(tx, now, audit.Event.SEND_REFUSED, audit.Outcome.REFUSED, who,
                             user_id=user_id, factor_id=factor_id, application=application,
                             detail=detail)
        except MfaError:
            log.warning("send refusal not audited", exc_info=True)
        # No number, no user id: the limit and the country are what an operator acts on.
        log.warning("phone code refused: %s", refusal.limit, extra={
            "limit": refusal.limit, "region": refusal.region,
            "retry_after_seconds": int(refusal.retry_after_seconds)})

    def gone(self, factor: Factor, now: datetime) -> bool:
        """A PENDING factor older than MFA_PENDING_TTL is gone: not listed, not
        challenged, not confirmed (a QR code left on a screen, a passkey dialog
        cancelled, must not become a factor later)."""
        return (factor.status is FactorStatus.PENDING
                and now - factor.created_at >= self.rules.pending_ttl)

    def established_at(self, now: datetime, *, first: bool) -> datetime:
        """From when a factor activated (or codes issued) ``now`` is established: at once
        for the user's first factor and the codes that come with it, else after
        MFA_NEW_CREDENTIAL_HOLD (service/policy.py)."""
        return now if first else now + self.rules.new_credential_hold

    def refuse_if_locked(self, state: LockoutState | None, now: datetime, *,
                         recovery: bool = False) -> None:
        """Refuse a locked-out user (``recovery``: the attempt uses a recovery code, which
        still passes the hard limit; see service/limits.py)."""
        wait = self.lockout.refusal(state, now, recovery=recovery)
        if wait is None:
            return
        if wait == 0:
            raise FailedPrecondition(
                "too many failed verifications: pass with a recovery code, or an "
                "administrator must unlock this user",
                reason=ErrorReason.ERROR_REASON_ADMIN_RESET_REQUIRED)
        raise ResourceExhausted("too many failed verifications; wait before trying again",
                                retry_after_seconds=wait,
                                reason=ErrorReason.ERROR_REASON_USER_LOCKED_OUT)


# Which factor status each purpose needs before a challenge may be opened or approved.
_NEEDS_STATUS = {
    Purpose.LOGIN: FactorStatus.ACTIVE,
    Purpose.DISABLE: FactorStatus.ACTIVE,
    Purpose.CHANGE_PHONE: FactorStatus.ACTIVE,
    Purpose.REGENERATE_RECOVERY_CODES: FactorStatus.ACTIVE,
    Purpose.CONFIRM_ENROLLMENT: FactorStatus.PENDING,
}


def require_status(factor: Factor, purpose: Purpose) -> None:
    if factor.status is FactorStatus.DISABLED:
        raise FailedPrecondition("the factor is disabled",
                                 reason=ErrorReason.ERROR_REASON_FACTOR_DISABLED)
    needed = _NEEDS_STATUS[purpose]
    if factor.status is not needed:
        raise FailedPrecondition(
            f"this purpose needs a {needed.value} factor; the factor is {factor.status.value}",
            reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS,
            metadata={"factorStatus": factor.status.value})


# Methods of which a user may have several ACTIVE factors: passkeys, one per device (the
# database's partial unique index says the same: store/models.py). Every other method
# has at most one, and a second is refused (or, for a phone, a proven change).
SEVERAL_ACTIVE = frozenset({Method.PASSKEY})


def already_enrolled() -> FailedPrecondition:
    return FailedPrecondition(
        "the user already has an active factor of this method; disable it first",
        reason=ErrorReason.ERROR_REASON_ALREADY_ENROLLED)


def is_established(factor: Factor, now: datetime) -> bool:
    """An ACTIVE factor (or recovery-code set) past its hold (service/policy.py)."""
    return (factor.status is FactorStatus.ACTIVE and factor.established_at is not None
            and factor.established_at <= now)


def proof_evidence(factor: Factor, now: datetime) -> Evidence:
    """What an approved challenge on ACTIVE ``factor`` proves (service/policy.py)."""
    if factor.method is Method.RECOVERY_CODE:
        return (Evidence.ESTABLISHED_RECOVERY_CODE if is_established(factor, now)
                else Evidence.NEW_RECOVERY_CODE)
    return (Evidence.PROOF_WITH_ESTABLISHED if is_established(factor, now)
            else Evidence.PROOF_WITH_NEW)


async def owned_factor(ctx: Context, tx: Transaction, user_id: str, factor_id: str,
                       now: datetime) -> FactorRecord:
    record = await tx.factors.get(factor_id)
    # Another user's factor is "not found": no oracle for which ids exist. So is a
    # PENDING factor past MFA_PENDING_TTL: it is gone.
    if record is None or record.factor.user_id != user_id or ctx.gone(record.factor, now):
        raise FactorNotFound()
    return record
