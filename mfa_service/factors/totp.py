"""The authenticator app: TOTP (RFC 6238), enrolled with SHA1, 6 digits, 30-second steps.

Those parameters are the only ones every common app (Google/Microsoft Authenticator,
1Password, ...) honours from an otpauth URI, so enrolment fixes them, not settings. A
factor imported from another system (``mfa-service import``) keeps what its app was set
up with, within what RFC 6238 and the Key Uri Format describe: SHA1, SHA256 or SHA512,
6 or 8 digits, 30- or 60-second steps (``TotpParameters`` on the factor). The secret is
160 bits (RFC 4226 R6 recommends 160) and lives encrypted (AES-256-GCM) with the
factor id and user id as associated data, so a ciphertext copied onto another factor
row does not decrypt.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from datetime import datetime
from typing import TYPE_CHECKING

import pyotp

from mfa_service.crypto import Keyring
from mfa_service.domain import (
    DEFAULT_TOTP,
    Challenge,
    Channel,
    FactorRecord,
    Method,
    TotpAlgorithm,
    TotpParameters,
)
from mfa_service.errors import InvalidArgument
from mfa_service.factors import qr
from mfa_service.factors.base import (
    FAIL,
    PASS,
    CodeMethod,
    EnrollInput,
    EnrollmentMaterial,
    Provisioning,
    Verdict,
)
from mfa_service.factors.codes import normalise_digits

PERIOD_SECONDS = DEFAULT_TOTP.period
DIGITS = DEFAULT_TOTP.digits
SECRET_BYTES = 20  # 160 bits, RFC 4226 section 4 R6
MAX_ACCOUNT_NAME = 128
# What an imported factor may use: the values the Key Uri Format names and apps implement.
# 7 digits or 15-second steps are possible in theory, but no common app offers them, so a
# file that asks for them is more likely wrong than right.
SUPPORTED_DIGITS = (6, 8)
SUPPORTED_PERIODS = (30, 60)
# hashlib's names: hmac.digest takes them and computes in one call to OpenSSL.
_DIGESTS = {TotpAlgorithm.SHA1: "sha1", TotpAlgorithm.SHA256: "sha256",
            TotpAlgorithm.SHA512: "sha512"}

if TYPE_CHECKING:
    from mfa_service.store.database import Transaction


def secret_aad(factor_id: str, user_id: str) -> bytes:
    """Associated data binding a TOTP secret ciphertext to its factor and user."""
    return f"mfa-service/v1/totp-secret/{factor_id}/{user_id}".encode()


def time_step(at: datetime, period: int = PERIOD_SECONDS) -> int:
    """RFC 6238 T = floor((unix time - T0) / X) with T0 = 0."""
    return int(at.timestamp()) // period


def check_parameters(parameters: TotpParameters) -> TotpParameters:
    """``parameters`` if this module computes such codes, else ValueError saying why."""
    if parameters.digits not in SUPPORTED_DIGITS:
        raise ValueError("digits must be 6 or 8")
    if parameters.period not in SUPPORTED_PERIODS:
        raise ValueError("period must be 30 or 60 seconds")
    return parameters


def match_totp(secret: bytes, code: str, at: datetime, *, window: int,
               last_step: int | None,
               parameters: TotpParameters = DEFAULT_TOTP) -> int | None:
    """The time step ``code`` matches within +-``window`` steps of ``at``, else None.

    Steps are counted in the factor's own period, so ``last_step`` (what the store keeps)
    means the same step as long as the factor keeps its parameters, which it does for life.
    Only steps newer than ``last_step`` count: RFC 6238 section 5.2 says a verifier MUST
    NOT accept the second attempt of the same OTP. Every candidate is compared (no early
    exit) with a constant-time comparison. The store re-checks the step atomically.
    """
    check_parameters(parameters)
    digest, digits = _DIGESTS[parameters.algorithm], parameters.digits
    current = time_step(at, parameters.period)
    matched: int | None = None
    for step in range(current - window, current + window + 1):
        if step < 0:
            continue
        fresh = last_step is None or step > last_step
        if hmac.compare_digest(hotp(secret, step, digits, digest), code) and fresh:
            matched = step
    return matched


def hotp(secret: bytes, counter: int, digits: int, digest: str = "sha1") -> str:
    """RFC 4226 section 5.3 (RFC 6238 with the time step as the counter): the HMAC of
    the 8-byte big-endian counter, dynamic truncation to 31 bits, the last ``digits``
    decimal digits.

    On the raw secret: pyotp's generate_otp, which tests/unit holds this to, decodes its
    base32 secret again for every step (a third of Verify's TOTP time on the login path).
    """
    mac = hmac.digest(secret, counter.to_bytes(8, "big"), digest)
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def provisioning(secret: bytes, issuer: str, account_name: str, *, svg: bool = True,
                 png: bool = True) -> Provisioning:
    """The otpauth:// URI (Key Uri Format) and its QR code as SVG and/or PNG, encoded once
    and only when an image is asked for (factors/qr.py)."""
    secret_b32 = base64.b32encode(secret).decode().rstrip("=")
    uri = pyotp.TOTP(secret_b32, digits=DIGITS, interval=PERIOD_SECONDS).provisioning_uri(
        name=account_name, issuer_name=issuer)
    qr_svg, qr_png = "", b""
    if svg or png:
        symbol = qr.modules(uri, error="M")
        if svg:
            qr_svg = qr.svg(symbol, scale=4)
        if png:
            qr_png = qr.png(symbol, scale=5)
    return Provisioning(secret_base32=secret_b32, otpauth_uri=uri, qr_svg=qr_svg,
                        qr_png=qr_png)


class AuthenticatorApp(CodeMethod):
    """METHOD_AUTHENTICATOR_APP."""

    method = Method.AUTHENTICATOR_APP
    sends_code = False
    login_writes_deferred = True

    def __init__(self, keyring: Keyring, issuer: str, window: int) -> None:
        self._keyring = keyring
        self._issuer = issuer
        self._window = window

    @property
    def code_length(self) -> int:
        return DIGITS

    def code_length_of(self, record: FactorRecord) -> int:
        return record.totp.digits

    def channel_for(self, requested: Channel | None) -> Channel:
        if requested not in (None, Channel.NONE):
            raise InvalidArgument.single(
                "channel", "must be unset or CHANNEL_NONE for METHOD_AUTHENTICATOR_APP")
        return Channel.NONE

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        # The Key Uri Format forbids ':' in the account name (it separates the issuer).
        # A caller-given name must respect that; the default (the user id) is adapted.
        label = request.account_name or request.user_id.replace(":", "-")
        if len(label) > MAX_ACCOUNT_NAME or not label.isprintable() or ":" in label:
            raise InvalidArgument.single(
                "account_name",
                f"must be printable, without ':', at most {MAX_ACCOUNT_NAME} characters")
        secret = secrets.token_bytes(SECRET_BYTES)
        key_id, ciphertext = self._keyring.encrypt(
            secret, secret_aad(request.factor_id, request.user_id))
        return EnrollmentMaterial(
            label=label, masked_destination=label, secret_ciphertext=ciphertext,
            secret_key_id=key_id, provisioning=provisioning(
                secret, self._issuer, label, svg=request.qr_svg, png=request.qr_png))

    def parse_code(self, raw: str) -> str:
        # Either length an app may use; check() holds the code to the factor's own.
        return normalise_digits(raw, SUPPORTED_DIGITS)

    def new_code(self) -> str | None:
        return None  # the app computes the code itself

    async def check(self, tx: Transaction, record: FactorRecord, challenge: Challenge,
                    code: str, now: datetime) -> Verdict:
        digits = record.totp.digits
        if len(code) != digits:
            # Malformed for this factor, as parse_code would have said had it known the
            # factor: the transaction rolls back, so no attempt is counted (not a guess).
            raise InvalidArgument.single("code", f"must be {digits} digits")
        if record.secret_ciphertext is None or record.secret_key_id is None:
            return FAIL  # a disabled factor's secret has been wiped
        secret = self._keyring.decrypt(
            record.secret_key_id, record.secret_ciphertext,
            secret_aad(record.factor.factor_id, record.factor.user_id))
        step = match_totp(secret, code, now, window=self._window,
                          last_step=record.last_totp_step, parameters=record.totp)
        if step is None:
            return FAIL
        # RFC 6238 5.2: this step, and every older one, is used from now on.
        tx.later.factors.accept_totp_step(record.factor.factor_id, step, now)
        return PASS
