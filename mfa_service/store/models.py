"""Tables. Secrets never sit here in plaintext: codes and tokens are HMACs, TOTP secrets
AES-GCM ciphertexts; each carries the id of the key that made it (rotation)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, stored naive-UTC on every dialect
    (SQLite has no time zones; one representation keeps comparisons identical)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite returns text for RETURNING of some expressions
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(36)  # UUID text
USER_ID = String(128)
BigID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


ONE_ACTIVE_WHERE = "status = 'active' AND method <> 'passkey'"


class FactorRow(Base):
    __tablename__ = "factors"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, index=True)
    method: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(128))
    masked_destination: Mapped[str] = mapped_column(String(128))
    # Email address or E.164 number (needed to send; contact data, not a secret).
    destination: Mapped[str | None] = mapped_column(String(320))
    secret_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    secret_key_id: Mapped[str | None] = mapped_column(String(64))
    # RFC 6238 5.2: the last accepted time step; a code for this step or older is a replay.
    last_totp_step: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Language of the messages sent for this factor (BCP 47 primary tag, e.g. "en", "da").
    locale: Mapped[str] = mapped_column(String(16), server_default=text("'en'"))
    # A new phone factor enrolled through a phone change: the ACTIVE factor it replaces
    # when confirmed (both swap in one transaction).
    replaces_factor_id: Mapped[str | None] = mapped_column(ID)
    # The proof model (service/policy.py): from when this ACTIVE factor - or, on the
    # recovery-code factor, the current code set - may remove or replace what the user
    # had. The first factor at once; later ones after MFA_NEW_CREDENTIAL_HOLD.
    established_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The 2FA session whose step-up allowed this enrolment (NULL for a first factor):
    # confirming the PENDING factor needs it still live.
    enrolled_session_id: Mapped[str | None] = mapped_column(ID)
    # An authenticator app's TOTP parameters (domain.TotpParameters). NULL: RFC 6238's
    # SHA1, 6 digits, 30 s, which every enrolled app and every row older than these
    # columns uses; an app imported with other ones (mfa-service import) names them.
    totp_algorithm: Mapped[str | None] = mapped_column(String(8))
    totp_digits: Mapped[int | None] = mapped_column(Integer)
    totp_period: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # At most one ACTIVE factor per method per user, enforced by the database so two
        # confirmations racing each other cannot both win. Passkeys are the exception: a
        # user keeps one per device (phone, laptop, security key), as every WebAuthn
        # relying party allows.
        Index("uq_factors_one_active_per_method", "user_id", "method", unique=True,
              sqlite_where=text(ONE_ACTIVE_WHERE), postgresql_where=text(ONE_ACTIVE_WHERE)),
        # At most one PENDING factor per method per user: a newer enrolment supersedes
        # the older one in its transaction, and the database refuses a second.
        Index("uq_factors_one_pending_per_method", "user_id", "method", unique=True,
              sqlite_where=text("status = 'pending'"),
              postgresql_where=text("status = 'pending'")),
    )


# (index name, column): see ChallengeRow.__table_args__.
SENT_CHALLENGE_INDEXES = (
    ("ix_challenges_destination_time", "destination_key"),
    ("ix_challenges_phone_prefix_time", "phone_prefix_key"),
    ("ix_challenges_phone_region_time", "phone_region"),
)


class ChallengeRow(Base):
    __tablename__ = "challenges"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID)
    # Found by factor through uq_challenges_factor_request (factor_id leads it): no index
    # of its own (every index is one more write per login).
    factor_id: Mapped[str] = mapped_column(ForeignKey("factors.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    application: Mapped[str] = mapped_column(String(32))
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer)
    code_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    code_key_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    caller: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # An approved PURPOSE_CHANGE_PHONE challenge is a one-time proof: set when an Enroll uses it.
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # SHA-256 of the address or number a code was sent to (NULL: nothing was sent), so
    # codes per destination can be counted across users (SMS pumping, toll fraud).
    destination_key: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    # Phone codes only, so sends to a range or a country can be counted across users (SMS
    # pumping runs through number ranges an attacker rents; toll fraud through countries
    # with high termination fees): HMAC of the number less its last 4 digits (a prefix,
    # low-sensitivity, keyed all the same), and the number's region ("DK", "US", "001").
    phone_prefix_key: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    phone_region: Mapped[str | None] = mapped_column(String(8))

    __table_args__ = (
        # AIP-155 idempotency: one challenge per (factor, request_id); NULLs never collide.
        Index("uq_challenges_factor_request", "factor_id", "request_id", unique=True),
        Index("ix_challenges_user_time", "user_id", "created_at"),
        # The send counters' indexes hold only challenges that sent something: an app or
        # passkey challenge (NULL there) costs them no write. Their queries compare the
        # column with "=", which implies IS NOT NULL, so both databases use them.
        *(Index(name, column, "created_at", postgresql_where=text(f"{column} IS NOT NULL"),
                sqlite_where=text(f"{column} IS NOT NULL"))
          for name, column in SENT_CHALLENGE_INDEXES),
    )


class PhoneBudgetDayRow(Base):
    """Phone codes (SMS and voice) sent per UTC day, against MFA_PHONE_DAILY_BUDGET.

    One row per day, incremented by ``UPDATE ... WHERE used < budget`` in the transaction
    that sends (service/limits.py): the row lock makes concurrent senders in every
    process take the last units one at a time, so the budget is never overspent.
    """

    __tablename__ = "phone_budget_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    used: Mapped[int] = mapped_column(Integer)


class SessionRow(Base):
    __tablename__ = "sessions"
    # Room on each page for the idle deadline's slide as a heap-only update (migration
    # 0012): no index entry per slide.
    __table_args__ = ({"postgresql_with": {"fillfactor": 80}},)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    # HMAC-SHA256 of the bearer token; the token itself is never stored.
    token_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    token_key_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(USER_ID, index=True)
    factor_id: Mapped[str] = mapped_column(ID)
    method: Mapped[str] = mapped_column(String(32))
    application: Mapped[str] = mapped_column(String(32))
    caller: Mapped[str] = mapped_column(String(128))
    authenticated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    idle_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What CheckSession reports about how the session was established (amr, aal2,
    # trusted_device) is kept on the row, so its one hot read needs no join: the channel
    # the code went by (sms/voice for a phone; NULL when nothing was sent) and the
    # remembered browser that opened it without a code (NULL: a code or passkey did).
    channel: Mapped[str | None] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(ID)


class TrustedDeviceRow(Base):
    """Remembered browsers ("trusted devices"): a Verify with remember_device stores one,
    RecognizeDevice opens a session on it without a code.

    The browser holds a 256-bit bearer token; only its HMAC is stored (as for sessions).
    Bound to a user and an application. It ends at ``expires_at`` however often it is used,
    at ``idle_expires_at`` if unused, or when forgotten (``revoked_at``): by the user, by
    any change to the user's factors, by log out everywhere, or by an administrator.
    """

    __tablename__ = "trusted_devices"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, index=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    token_key_id: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    application: Mapped[str] = mapped_column(String(32))
    # The factor whose code remembered it: recognised only while that factor is ACTIVE.
    factor_id: Mapped[str] = mapped_column(ID)
    method: Mapped[str] = mapped_column(String(32))
    caller: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    idle_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeviceMissRow(Base):
    """Unknown device tokens presented from one client IP address in the current window
    (RecognizeDevice's per-IP limit). The key is a hash of the address, counted under an
    advisory lock on it; rows whose window ended are purged."""

    __tablename__ = "device_misses"

    ip_key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    misses: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OutboxRow(Base):
    """Messages to send, written in the transaction that decided to send them.

    The body is AES-GCM encrypted (it may hold a code) with the row id as associated
    data, and wiped once the message is sent or dropped. A dispatcher claims due rows
    for a lease (``claimed_until``/``claim_token``), sends, then settles the row only if
    its claim still holds, so two processes never send the same row concurrently.
    """

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(16))  # "code" | "notice"
    channel: Mapped[str] = mapped_column(String(16))
    destination: Mapped[str] = mapped_column(String(320))
    user_id: Mapped[str] = mapped_column(USER_ID)
    factor_id: Mapped[str | None] = mapped_column(ID)
    challenge_id: Mapped[str | None] = mapped_column(ID)
    payload_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload_key_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # pending|sent|expired|superseded|failed
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)  # drop, never send, after this
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_token: Mapped[str | None] = mapped_column(String(36))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (Index("ix_outbox_due", "state", "next_attempt_at"),)


class UserLockoutRow(Base):
    """Consecutive failed verifications per user, across factors and callers.

    One row per user, locked (FOR UPDATE) by every Verify of that user, so the count and
    the lockout decision are atomic under concurrency (NIST SP 800-63B 5.2.2 throttling).
    """

    __tablename__ = "user_lockouts"

    user_id: Mapped[str] = mapped_column(USER_ID, primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set at the hard limit (100 consecutive failures): only a recovery code of the user
    # (or an administrator) unlocks; codes of the other factors are refused meanwhile.
    admin_reset_required: Mapped[bool] = mapped_column(server_default=text("false"))
    # One more on every lock, never reset (the row is never deleted): a statement that
    # takes the lock and reads in one go compares it with what its snapshot saw, to know
    # whether another transaction of the user committed in between (store/hot.py).
    lock_version: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class RecoveryCodeRow(Base):
    """Single-use recovery codes, stored as keyed hashes (HMAC-SHA256) only."""

    __tablename__ = "recovery_codes"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(USER_ID, index=True)
    code_hash: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("uq_recovery_codes_hash", "code_hash", unique=True),)


class AuditEventRow(Base):
    """The audit trail: who did what to whose factor, from where. Never a code,
    secret or token (``detail`` holds only non-secret facts such as a result)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    __table_args__ = (Index("ix_audit_events_user_time", "user_id", "occurred_at"),)
    event: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(32))
    # Found by user through ix_audit_events_user_time (user_id leads it).
    user_id: Mapped[str | None] = mapped_column(USER_ID)
    factor_id: Mapped[str | None] = mapped_column(ID)
    challenge_id: Mapped[str | None] = mapped_column(ID)
    session_id: Mapped[str | None] = mapped_column(ID)
    caller: Mapped[str] = mapped_column(String(128))
    application: Mapped[str | None] = mapped_column(String(32))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    detail: Mapped[str | None] = mapped_column(Text)


factors = cast(Table, FactorRow.__table__)
challenges = cast(Table, ChallengeRow.__table__)
sessions = cast(Table, SessionRow.__table__)
audit_events = cast(Table, AuditEventRow.__table__)
user_lockouts = cast(Table, UserLockoutRow.__table__)
recovery_codes = cast(Table, RecoveryCodeRow.__table__)
outbox = cast(Table, OutboxRow.__table__)
phone_budget_days = cast(Table, PhoneBudgetDayRow.__table__)
trusted_devices = cast(Table, TrustedDeviceRow.__table__)
device_misses = cast(Table, DeviceMissRow.__table__)
