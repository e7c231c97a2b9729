"""Domain values shared by every layer: enums and frozen records.

The enum values are what the store writes (short lowercase words); the transport layer
maps them to and from the proto enums in one table (transport/convert.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from mfa_service.errors import PermissionDenied


class Method(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    AUTHENTICATOR_APP = "authenticator_app"
    RECOVERY_CODE = "recovery_code"
    PASSKEY = "passkey"


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    VOICE = "voice"
    NONE = "none"


class Purpose(StrEnum):
    LOGIN = "login"
    CONFIRM_ENROLLMENT = "confirm_enrollment"
    DISABLE = "disable"
    CHANGE_PHONE = "change_phone"
    REGENERATE_RECOVERY_CODES = "regenerate_recovery_codes"


class ProofField(StrEnum):
    """Which request field carries the proof a factor's method reads."""

    CODE = "code"
    WEBAUTHN_RESPONSE = "webauthn_response"


class RevokeScope(StrEnum):
    """Why sessions ended (the audit row's ``scope``)."""

    FACTOR_REMOVED = "factor_removed"  # the factor that created them was disabled/replaced
    LOGOUT = "logout"  # one session, by its token
    ALL_SESSIONS = "all_sessions"  # every session of the user: log out everywhere
    ALL_OTHER_SESSIONS = "all_other_sessions"  # every other: log out everywhere else
    DEVICE_FORGOTTEN = "device_forgotten"  # the remembered browser that opened them


class ForgetScope(StrEnum):
    """Why remembered browsers (trusted devices) were forgotten (the audit row's
    ``scope``)."""

    FACTOR_CHANGED = "factor_changed"  # a factor added, removed or replaced, codes changed
    FORGOTTEN = "forgotten"  # ForgetDevice: this one browser
    ALL_SESSIONS = "all_sessions"  # RevokeSession(user_id): log out everywhere
    ADMIN_RESET = "admin_reset"  # mfa-service admin reset-user
    TOO_MANY = "too_many"  # the user's oldest, making room for a newer one


class RevokeTarget(StrEnum):
    """What RevokeSession names: one session by its token, or a user."""

    SESSION_TOKEN = "session_token"  # noqa: S105 - a field name, not a token
    USER_ID = "user_id"


class DeliveryOutcome(StrEnum):
    """What became of one attempt to send an outbox message (the delivery metric)."""

    SENT = "sent"
    SUPERSEDED = "superseded"  # its challenge closed before it went
    EXPIRED = "expired"  # its code's life ended before it went
    FAILED = "failed"  # the provider refused it for good
    RETRY = "retry"  # the provider failed; tried again later


class MessageKind(StrEnum):
    """What an outbox message carries."""

    CODE = "code"  # a one-time code for a challenge
    NOTICE = "notice"  # a security notice: no code


class NoticeKind(StrEnum):
    """Why the user is told something changed (delivery/templates.py words each one)."""

    FACTOR_ADDED = "factor_added"
    FACTOR_REMOVED = "factor_removed"
    PHONE_CHANGED = "phone_changed"
    RECOVERY_CODES_USED = "recovery_codes_used"
    RECOVERY_CODES_REGENERATED = "recovery_codes_regenerated"
    ACCOUNT_LOCKED = "account_locked"
    SECOND_FACTOR_RESET = "second_factor_reset"  # an operator's reset (admin reset-user)


class TotpAlgorithm(StrEnum):
    """The HMAC an authenticator app's codes use (RFC 6238 section 1.2)."""

    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"


@dataclass(frozen=True)
class TotpParameters:
    """How an authenticator app computes its codes. Enrolment always uses the defaults
    (RFC 6238's, the only ones every common app honours); a factor imported from another
    system keeps the ones its app was set up with (factors/totp.py says which)."""

    algorithm: TotpAlgorithm = TotpAlgorithm.SHA1
    digits: int = 6
    period: int = 30  # seconds per time step


DEFAULT_TOTP = TotpParameters()


class Application(StrEnum):
    PORTAL = "portal"
    BACKOFFICE = "backoffice"


class FactorStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    DISABLED = "disabled"


class ChallengeState(StrEnum):
    """Where a challenge is; only OPEN accepts codes."""

    OPEN = "open"
    APPROVED = "approved"
    EXHAUSTED = "exhausted"  # max wrong attempts reached: terminal
    SUPERSEDED = "superseded"  # a newer challenge for the same factor and purpose replaced it


class VerifyResult(StrEnum):
    APPROVED = "approved"
    INVALID_CODE = "invalid_code"
    EXPIRED = "expired"
    MAX_ATTEMPTS_REACHED = "max_attempts_reached"
    ALREADY_USED = "already_used"


@dataclass(frozen=True)
class Caller:
    """Who is calling this service (a backend, not the end user), and what it may do."""

    name: str
    # Least privilege: a caller may do nothing that it was not granted.
    applications: frozenset[Application] = frozenset()
    audit_reader: bool = False


@dataclass(frozen=True)
class Factor:
    factor_id: str
    user_id: str
    method: Method
    status: FactorStatus
    masked_destination: str
    created_at: datetime
    confirmed_at: datetime | None = None
    last_used_at: datetime | None = None
    disabled_at: datetime | None = None
    established_at: datetime | None = None  # see service/policy.py


@dataclass(frozen=True)
class FactorRecord:
    """A factor as stored, including what only the service may see."""

    factor: Factor
    label: str
    destination: str | None
    secret_ciphertext: bytes | None
    secret_key_id: str | None
    last_totp_step: int | None
    locale: str = "en"
    replaces_factor_id: str | None = None
    enrolled_session_id: str | None = None  # the session whose step-up allowed Enroll
    totp: TotpParameters = DEFAULT_TOTP  # authenticator apps only


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    user_id: str
    factor_id: str
    purpose: Purpose
    application: Application
    channel: Channel
    state: ChallengeState
    attempts: int
    max_attempts: int
    created_at: datetime
    expires_at: datetime
    code_hash: bytes | None = None
    code_key_id: str | None = None
    request_id: str | None = None
    approved_at: datetime | None = None
    consumed_at: datetime | None = None
    destination_key: bytes | None = None  # set when a code was sent (per-destination limit)


@dataclass(frozen=True)
class Proof:
    """What the user offers on a challenge: a typed code, or (passkeys) the browser's
    WebAuthn response JSON. Exactly one is set; which one the factor wants is its own
    ``proof_field``. Never in a repr: both are secrets while the challenge is open."""

    code: str = field(default="", repr=False)
    webauthn_response: str = field(default="", repr=False)

    def field_for(self, wanted: ProofField) -> str:
        """The proof in the field ``wanted``."""
        return self.webauthn_response if wanted is ProofField.WEBAUTHN_RESPONSE else self.code


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    factor_id: str
    method: Method
    application: Application
    authenticated_at: datetime
    expires_at: datetime
    idle_expires_at: datetime
    # How the code reached the user (SMS or voice for a phone); None when nothing was
    # sent, or for sessions from before it was recorded.
    channel: Channel | None = None
    # The remembered browser that opened it without a code (RecognizeDevice), or None.
    device_id: str | None = None


@dataclass(frozen=True)
class TrustedDevice:
    """A remembered browser: a long-lived credential of the browser itself, bound to a
    user and an application, that opens a 2FA session without a code."""

    device_id: str
    user_id: str
    label: str
    application: Application
    factor_id: str  # the factor whose code remembered it
    method: Method
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    idle_expires_at: datetime


@dataclass(frozen=True)
class NewDevice:
    """A browser just remembered: the only time its token exists in the clear."""

    device: TrustedDevice
    token: str = field(repr=False)


@dataclass(frozen=True)
class NewSession:
    """A session just created: the only time its token exists in the clear."""

    session: Session
    token: str


@dataclass(frozen=True)
class Outgoing:
    """A message the service decided to send; the outbox makes it durable."""

    kind: MessageKind
    channel: Channel
    destination: str
    user_id: str
    subject: str
    text: str = field(repr=False)  # holds the code: never in a repr, a log or a traceback
    not_after: datetime
    factor_id: str | None = None
    challenge_id: str | None = None


class _Recorded(StrEnum):
    """A kind stored in the audit trail. A value this version does not know (written by a
    newer one during a rolling upgrade) reads back as itself rather than failing the read."""

    @classmethod
    def _missing_(cls, value: object) -> _Recorded | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = "UNRECOGNISED"
        member._value_ = value
        return member


class AuditEventType(_Recorded):
    """What an audit row records (audit_events.event)."""

    ENROLL = "enroll"
    CONFIRM = "factor_confirmed"
    CHALLENGE = "challenge_opened"
    VERIFY = "verify"
    DISABLE = "factor_disabled"
    PHONE_CHANGED = "phone_changed"
    LOCKOUT = "lockout"
    RECOVERY_CODE_USED = "recovery_code_used"
    RECOVERY_CODES_ISSUED = "recovery_codes_issued"
    SESSION_CREATED = "session_created"
    SESSION_REVOKED = "session_revoked"
    ADMIN_RESET = "admin_reset"  # an operator reset a user's second factor (admin-cli)
    ALL_SESSIONS_ENDED = "all_sessions_ended"  # an operator ended every user's sessions
    KEYS_ROTATED = "keys_rotated"  # stored secrets re-encrypted under the primary key
    # A proof that was refused for a reason the security team should look at: a passkey
    # whose signature counter went backwards (detail "alarm": passkey_counter_regressed)
    # may have been cloned.
    ALARM = "security_alarm"
    # A phone code refused by a cap across users (detail "limit": phone_prefix,
    # phone_country or phone_daily_budget; "region"): SMS pumping / toll fraud signals.
    SEND_REFUSED = "send_refused"
    # Remembered browsers (service/devices.py): remembered on a login (detail device_id,
    # application), recognised by RecognizeDevice (a session without a code), a token not
    # recognised (detail "reason": unknown - counted against the lockout - or not_live: a
    # device of the user that ended, or of another application), forgotten (detail
    # "scope": domain.ForgetScope). Never the token.
    DEVICE_REMEMBERED = "device_remembered"
    DEVICE_RECOGNIZED = "device_recognized"
    DEVICE_NOT_RECOGNIZED = "device_not_recognized"
    DEVICE_FORGOTTEN = "device_forgotten"
    # A factor brought in ACTIVE from another system by `mfa-service import` (caller
    # import-cli; detail: method, the file's line, the run's id).
    IMPORTED = "factor_imported"


class AuditOutcome(_Recorded):
    """How it ended (audit_events.outcome)."""

    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"  # a limit said no before anything was attempted
    INCOMPLETE = "incomplete"  # an operator's batch job stopped before the end
    NOTHING_TO_RESET = "nothing_to_reset"  # an admin reset found nothing to take away


@dataclass(frozen=True)
class AuditEvent:
    """One row of the audit trail, as read back."""

    event_id: int
    occurred_at: datetime
    event: AuditEventType
    outcome: AuditOutcome
    user_id: str | None
    factor_id: str | None
    challenge_id: str | None
    session_id: str | None
    caller: str
    application: str | None
    client_ip: str | None
    user_agent: str | None
    detail: dict[str, Any]


def require_application(granted: frozenset[Application], application: Application) -> None:
    """PermissionDenied unless ``application`` is among the caller's ``granted`` ones."""
    if application not in granted:
        raise PermissionDenied(
            f"this caller may not act for the {application.value} application",
            metadata={"application": application.value})


@dataclass(frozen=True)
class AuditContext:
    """Who did it and from where (for the audit trail, never a secret), and what that
    caller may do."""

    caller: str
    client_ip: str = ""
    user_agent: str = ""
    # Least privilege: a context that forgot to say what the caller may do grants nothing.
    applications: frozenset[Application] = frozenset()
    audit_reader: bool = False

    def authorize(self, application: Application) -> None:
        """PermissionDenied unless this caller may act for ``application``."""
        require_application(self.applications, application)

    def authorize_any(self) -> None:
        """PermissionDenied unless this caller may act for at least one application
        (user-level calls that name no application: ListFactors, RevokeSession)."""
        if not self.applications:
            raise PermissionDenied("this caller may not act for any application")

    @property
    def sole_application(self) -> Application | None:
        """The application this caller acts for when it has exactly one (for the audit)."""
        return next(iter(self.applications)) if len(self.applications) == 1 else None
