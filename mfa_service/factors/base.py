"""The protocol every factor method implements, and the values it trades in.

A method knows how to set itself up for a user, what its codes look like, and whether a
code proves possession, finishing its own atomic step in the store when it has one (the
TOTP step accepted, the recovery code consumed). The rules around it (attempts, single
use, sessions, lockout) live once, in the service layer, for all methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from mfa_service.domain import Challenge, Channel, FactorRecord, Method, ProofField

if TYPE_CHECKING:
    from mfa_service.store.database import Transaction


@dataclass(frozen=True)
class EnrollInput:
    """What the caller asked for, already validated for shape by the transport."""

    factor_id: str
    user_id: str
    email: str = ""
    phone_number: str = ""
    channel: Channel | None = None
    account_name: str = ""
    qr_svg: bool = True  # authenticator app: draw the QR code as SVG
    qr_png: bool = True  # ... and/or as PNG


@dataclass(frozen=True)
class Provisioning:
    """What an authenticator app needs; returned once, at enrolment."""

    secret_base32: str
    otpauth_uri: str
    qr_svg: str  # "" when not asked for
    qr_png: bytes  # b"" when not asked for


@dataclass(frozen=True)
class EnrollmentMaterial:
    """What to store for a new factor, and what to show the user once."""

    label: str
    masked_destination: str
    destination: str | None = None
    secret_ciphertext: bytes | None = None
    secret_key_id: str | None = None
    provisioning: Provisioning | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Alarm(StrEnum):
    """A failed check the security team should see (audited as its own event)."""

    # A passkey whose signature counter did not grow: possibly a cloned authenticator
    # (W3C WebAuthn 6.1.1).
    PASSKEY_COUNTER_REGRESSED = "passkey_counter_regressed"


class Refusal(StrEnum):
    """Which check refused a proof, for the audit (one word, never the proof itself)."""

    ANOTHER_CHALLENGE = "another_challenge"  # the response answers another challenge
    REGISTRATION_REFUSED = "registration_refused"  # origin, RP ID, UV or signature
    CREDENTIAL_ALREADY_REGISTERED = "credential_already_registered"
    NO_CREDENTIAL = "no_credential"  # the factor holds no credential (wiped)
    OTHER_CREDENTIAL = "other_credential"  # an assertion by another credential
    ASSERTION_REFUSED = "assertion_refused"  # origin, RP ID, UV or signature


@dataclass(frozen=True)
class Verdict:
    """The answer of ``FactorMethod.check``."""

    ok: bool
    # A failure the security team should see (audited as its own event), e.g. a passkey
    # whose signature counter went backwards: a possible cloned authenticator.
    alarm: Alarm | None = None
    detail: dict[str, int | str] = field(default_factory=dict)
    # Set when the check named the factor anew (a passkey's model, known once registered).
    display_name: str | None = None
    reason: Refusal | None = None  # why it failed, for the audit (never the proof)

    @classmethod
    def of(cls, ok: bool) -> Verdict:
        return PASS if ok else FAIL

    @classmethod
    def fail(cls, reason: Refusal) -> Verdict:
        return cls(ok=False, reason=reason)


PASS = Verdict(ok=True)
FAIL = Verdict(ok=False)


class FactorMethod(Protocol):
    """One way to pass a second factor."""

    method: Method
    sends_code: bool  # True: the service sends a code (email, phone); False: the user has it
    # A login's check only defers its writes (a TOTP step, a passkey counter): nothing is
    # written at once, so the login may try without the user's lock (service/optimism.py).
    login_writes_deferred: bool
    # The request field that carries the proof: a typed code, or the browser's WebAuthn
    # response (VerifyRequest/DisableRequest.webauthn_response).
    proof_field: ProofField
    # A shorter life for this method's challenges than the configured code validity.
    max_challenge_ttl: timedelta | None
    # Still accepted past the lockout's hard limit (service/lockout.py): a look-up secret
    # too long to guess (recovery codes); every guessable code stops there.
    passes_hard_lockout: bool

    @property
    def code_length(self) -> int: ...

    def code_length_of(self, record: FactorRecord) -> int:
        """The length of the codes ``record`` takes (``code_length`` unless the factor has
        its own: an authenticator app imported with 8-digit codes)."""
        ...

    def channel_for(self, requested: Channel | None) -> Channel:
        """The channel to use, or InvalidArgument if ``requested`` makes no sense here."""
        ...

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        """Validate the destination and create the factor's secret material."""
        ...

    def parse_code(self, raw: str) -> str:
        """Normalise what the user typed, or raise InvalidArgument if it cannot be a code."""
        ...

    def new_code(self) -> str | None:
        """A fresh code to send, or None when the user already holds the code (TOTP)."""
        ...

    async def browser_options(self, tx: Transaction, record: FactorRecord,
                              challenge: Challenge) -> str | None:
        """What the browser needs to answer ``challenge`` (WebAuthn options JSON), or None."""
        ...

    async def check(self, tx: Transaction, record: FactorRecord, challenge: Challenge,
                    code: str, now: datetime) -> Verdict:
        """Whether ``code`` proves possession of the factor for ``challenge``; when it
        does, the method's own single-use step is done in ``tx`` (the caller holds the
        user's lock and read ``record`` after taking it)."""
        ...


class CodeMethod:
    """What the methods with a typed code share: no browser step, the configured validity."""

    proof_field: ProofField = ProofField.CODE
    max_challenge_ttl: timedelta | None = None
    passes_hard_lockout: bool = False

    @property
    def code_length(self) -> int:
        raise NotImplementedError

    def code_length_of(self, record: FactorRecord) -> int:
        return self.code_length

    async def browser_options(self, tx: Transaction, record: FactorRecord,
                              challenge: Challenge) -> str | None:
        return None
