"""The rules the use cases apply, as values and pure checks: the limits (``Rules``, built
from Settings once), which factor status each purpose needs, when a factor is established
and what a proof with it is worth in the proof model (service/policy.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.domain import Factor, FactorRecord, FactorStatus, Method, Purpose
from mfa_service.errors import FactorNotFound, FailedPrecondition
from mfa_service.service.limits import SendQuota
from mfa_service.service.policy import Evidence
from mfa_service.settings import Settings
from mfa_service.store.database import Transaction


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

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        s = settings
        return cls(code_ttl=timedelta(seconds=s.code_ttl_seconds),
                   max_attempts=s.max_attempts,
                   max_factors_per_user=s.max_factors_per_user,
                   resend_cooldown=timedelta(seconds=s.resend_cooldown_seconds),
                   max_sends=s.max_sends_per_window,
                   send_window=timedelta(seconds=s.send_window_seconds),
                   max_sends_per_destination=s.max_sends_per_destination,
                   max_sends_per_phone_prefix=s.max_sends_per_phone_prefix,
                   max_sends_per_phone_country=s.max_sends_per_phone_country,
                   phone_daily_budget=s.phone_daily_budget,
                   change_proof_max_age=timedelta(seconds=s.change_proof_max_age_seconds),
                   pending_ttl=timedelta(minutes=s.pending_ttl_minutes),
                   new_credential_hold=timedelta(hours=s.new_credential_hold_hours),
                   product=s.product_name, default_locale=s.default_locale)

    @property
    def quota(self) -> SendQuota:
        return SendQuota(cooldown=self.resend_cooldown, window=self.send_window,
                         per_user_method=self.max_sends,
                         per_destination=self.max_sends_per_destination,
                         per_phone_prefix=self.max_sends_per_phone_prefix,
                         per_phone_country=self.max_sends_per_phone_country,
                         phone_daily_budget=self.phone_daily_budget)

    def gone(self, factor: Factor, now: datetime) -> bool:
        """A PENDING factor older than MFA_PENDING_TTL is gone: not listed, not
        challenged, not confirmed (a QR code left on a screen, a passkey dialog
        cancelled, must not become a factor later)."""
        return (factor.status is FactorStatus.PENDING
                and now - factor.created_at >= self.pending_ttl)

    def established_at(self, now: datetime, *, first: bool) -> datetime:
        """From when a factor activated (or codes issued) ``now`` is established: at once
        for the user's first factor and the codes that come with it, else after
        MFA_NEW_CREDENTIAL_HOLD (service/policy.py)."""
        return now if first else now + self.new_credential_hold


def new_id() -> str:
    return str(uuid.uuid4())


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


def login_evidence(factor: Factor) -> Evidence:
    """What an approved LOGIN challenge on ``factor`` shows (service/policy.py)."""
    return (Evidence.RECOVERY_CODE if factor.method is Method.RECOVERY_CODE
            else Evidence.PROOF_WITH_ACTIVE)


async def owned_factor(tx: Transaction, rules: Rules, user_id: str, factor_id: str,
                       now: datetime) -> FactorRecord:
    return owned(rules, user_id, await tx.factors.get(factor_id), now)


def owned(rules: Rules, user_id: str, record: FactorRecord | None,
          now: datetime) -> FactorRecord:
    """``record`` if it is ``user_id``'s and not gone, else FactorNotFound."""
    # Another user's factor is "not found": no oracle for which ids exist. So is a
    # PENDING factor past MFA_PENDING_TTL: it is gone.
    if record is None or record.factor.user_id != user_id or rules.gone(record.factor, now):
        raise FactorNotFound()
    return record
