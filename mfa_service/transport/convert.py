"""Proto <-> domain: request validation (shape only) and response building.

Every request is checked field by field and all violations are reported together in
one INVALID_ARGUMENT with a BadRequest detail. Semantic rules (does the factor exist,
may it be challenged) belong to the service layer.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from email_validator import EmailNotValidError, validate_email
from google.protobuf.timestamp_pb2 import Timestamp
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service import domain
from mfa_service.errors import FieldViolation, InvalidArgument
from mfa_service.service.assurance import SessionAssurance
from mfa_service.service.challenges import ChallengeCommand, ChallengeResult
from mfa_service.service.enrolment import EnrollCommand, EnrollResult
from mfa_service.service.verification import VerifyOutcome

K = TypeVar("K", bound=int)
V = TypeVar("V")

MAX_USER_ID = 128
MAX_REQUEST_ID = 64
MAX_CODE = 64
MAX_TOKEN = 256
MAX_USER_AGENT = 512
MAX_TEXT = 320
# What the store keeps (store/models.py; PostgreSQL enforces VARCHAR lengths, SQLite does
# not, so a longer value used to pass on SQLite and end INTERNAL on PostgreSQL):
# an email address is the factor's label (128) and is shown masked, which is up to three
# characters longer ("j•••@example.com"); a locale goes in a VARCHAR(16); a client IP
# (IPv6 with a scope id can be long) in the audit trail's VARCHAR(64).
MAX_EMAIL = 125
MAX_LOCALE = 16
MAX_CLIENT_IP = 64
# A remembered browser's name, as the trusted_devices column keeps it.
MAX_DEVICE_LABEL = 64
LOCALE_RE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")
MAX_PAGE = 500
MAX_INT64 = 2**63 - 1
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
DEFAULT_PAGE = 100

METHODS = {
    pb.METHOD_EMAIL: domain.Method.EMAIL,
    pb.METHOD_PHONE: domain.Method.PHONE,
    pb.METHOD_AUTHENTICATOR_APP: domain.Method.AUTHENTICATOR_APP,
    pb.METHOD_RECOVERY_CODE: domain.Method.RECOVERY_CODE,
    pb.METHOD_PASSKEY: domain.Method.PASSKEY,
}
CHANNELS = {
    pb.CHANNEL_EMAIL: domain.Channel.EMAIL,
    pb.CHANNEL_SMS: domain.Channel.SMS,
    pb.CHANNEL_VOICE: domain.Channel.VOICE,
    pb.CHANNEL_NONE: domain.Channel.NONE,
}
PURPOSES = {
    pb.PURPOSE_LOGIN: domain.Purpose.LOGIN,
    pb.PURPOSE_CONFIRM_ENROLLMENT: domain.Purpose.CONFIRM_ENROLLMENT,
    pb.PURPOSE_DISABLE: domain.Purpose.DISABLE,
    pb.PURPOSE_CHANGE_PHONE: domain.Purpose.CHANGE_PHONE,
    pb.PURPOSE_REGENERATE_RECOVERY_CODES: domain.Purpose.REGENERATE_RECOVERY_CODES,
}
APPLICATIONS = {
    pb.APPLICATION_PORTAL: domain.Application.PORTAL,
    pb.APPLICATION_BACKOFFICE: domain.Application.BACKOFFICE,
}
STATUSES = {
    domain.FactorStatus.PENDING: pb.FACTOR_STATUS_PENDING,
    domain.FactorStatus.ACTIVE: pb.FACTOR_STATUS_ACTIVE,
    domain.FactorStatus.DISABLED: pb.FACTOR_STATUS_DISABLED,
}
RESULTS = {
    domain.VerifyResult.APPROVED: pb.VERIFY_RESULT_APPROVED,
    domain.VerifyResult.INVALID_CODE: pb.VERIFY_RESULT_INVALID_CODE,
    domain.VerifyResult.EXPIRED: pb.VERIFY_RESULT_EXPIRED,
    domain.VerifyResult.MAX_ATTEMPTS_REACHED: pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED,
    domain.VerifyResult.ALREADY_USED: pb.VERIFY_RESULT_ALREADY_USED,
}
METHODS_OUT = {v: k for k, v in METHODS.items()}
CHANNELS_OUT = {v: k for k, v in CHANNELS.items()}
APPLICATIONS_OUT = {v: k for k, v in APPLICATIONS.items()}


class _Checker:
    """Collects field violations; ``done()`` raises them all at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)

    def text(self, field: str, value: str, *, max_len: int, required: bool,
             trim_ok: bool = False) -> str:
        if not value:
            if required:
                self.bad(field, "is required")
            return ""
        if len(value) > max_len:
            self.bad(field, f"must be at most {max_len} characters")
        elif not value.isprintable():
            self.bad(field, "must be printable")
        elif value != value.strip() and not trim_ok:
            self.bad(field, "must not have leading or trailing spaces")
        return value

    def account_email(self, value: str) -> str | None:
        """The optional ``account_email`` (where notices also go), normalised; None."""
        if not self.text("account_email", value, max_len=MAX_EMAIL, required=False):
            return None
        try:
            return str(validate_email(value, check_deliverability=False).normalized)
        except EmailNotValidError:
            # Not the library's message: it quotes the input back into logs.
            self.bad("account_email", "is not a valid email address")
            return None

    def user_id(self, value: str, field: str = "user_id") -> str:
        return self.text(field, value, max_len=MAX_USER_ID, required=True)

    def resource_id(self, field: str, value: str) -> str:
        if not value:
            self.bad(field, "is required")
            return ""
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            parsed = None
        if parsed is None or str(parsed) != value:
            self.bad(field, "must be an id returned by this service (a lowercase UUID)")
        return value

    def enum(self, field: str, value: K, table: dict[K, V], allowed: str) -> V | None:
        if value == 0:
            self.bad(field, f"is required: one of {allowed}")
            return None
        if value not in table:
            self.bad(field, f"unknown value {value}; use one of {allowed}")
            return None
        return table[value]

    def optional_channel(self, value: pb.Channel.ValueType) -> domain.Channel | None:
        if value == pb.CHANNEL_UNSPECIFIED:
            return None
        if value not in CHANNELS:
            self.bad("channel", f"unknown value {value}")
            return None
        return CHANNELS[value]

    def timestamp(self, field: str, value: Timestamp) -> datetime | None:
        """A Timestamp in the range google.protobuf.Timestamp allows (years 1-9999)."""
        if not (MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
                and 0 <= value.nanos < 1_000_000_000):
            self.bad(field, "must be a time between the years 1 and 9999")
            return None
        return value.ToDatetime(UTC)

    def audit_fields(self, client_ip: str, user_agent: str) -> None:
        if client_ip:
            try:
                ipaddress.ip_address(client_ip)
                valid = len(client_ip) <= MAX_CLIENT_IP and client_ip.isprintable()
            except ValueError:
                valid = False
            if not valid:  # a scope id may hold anything but '%', NUL included
                self.bad("client_ip", "must be an IPv4 or IPv6 address "
                                      f"(at most {MAX_CLIENT_IP} characters)")
        self.text("user_agent", user_agent, max_len=MAX_USER_AGENT, required=False)


_METHOD_NAMES = "METHOD_EMAIL, METHOD_PHONE, METHOD_AUTHENTICATOR_APP, METHOD_PASSKEY"
# A browser's credential.toJSON() is a few KiB; the factor module refuses more than 64 KiB
# with its own message, this bound only keeps absurd input out of the parser.
MAX_WEBAUTHN_RESPONSE = 64 * 1024
_APP_NAMES = "APPLICATION_PORTAL, APPLICATION_BACKOFFICE"
_PURPOSE_NAMES = ("PURPOSE_LOGIN, PURPOSE_CONFIRM_ENROLLMENT, PURPOSE_DISABLE, "
                  "PURPOSE_CHANGE_PHONE, PURPOSE_REGENERATE_RECOVERY_CODES")


def enroll_command(req: pb.EnrollRequest) -> EnrollCommand:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    method = c.enum("method", req.method, METHODS, _METHOD_NAMES)
    application = c.enum("application", req.application, APPLICATIONS, _APP_NAMES)
    channel = c.optional_channel(req.channel)
    c.text("email", req.email, max_len=MAX_EMAIL, required=False)
    c.text("phone_number", req.phone_number, max_len=32, required=False)
    c.text("account_name", req.account_name, max_len=MAX_TEXT, required=False)
    if req.change_proof_challenge_id:
        c.resource_id("change_proof_challenge_id", req.change_proof_challenge_id)
    c.text("session_token", req.session_token, max_len=MAX_TOKEN, required=False)
    if req.qr_image not in pb.QrImage.values():
        c.bad("qr_image", "must be one of QR_IMAGE_SVG, QR_IMAGE_PNG, QR_IMAGE_NONE (or unset)")
    if req.locale and (len(req.locale) > MAX_LOCALE or not LOCALE_RE.fullmatch(req.locale)):
        c.bad("locale", "must be a BCP 47 language tag such as 'en' or 'da-DK' "
                        f"(at most {MAX_LOCALE} characters)")
    if method is not domain.Method.EMAIL and req.email:
        c.bad("email", "is only for METHOD_EMAIL")
    if method is not domain.Method.PHONE:
        if req.phone_number:
            c.bad("phone_number", "is only for METHOD_PHONE")
        if req.change_proof_challenge_id:
            c.bad("change_proof_challenge_id", "is only for METHOD_PHONE")
    c.done()
    assert method is not None and application is not None
    return EnrollCommand(
        user_id=user_id, method=method, application=application, email=req.email,
        phone_number=req.phone_number, channel=channel, account_name=req.account_name,
        change_proof_challenge_id=req.change_proof_challenge_id or None,
        locale=req.locale.lower(), session_token=req.session_token,
        qr_svg=req.qr_image in (pb.QR_IMAGE_UNSPECIFIED, pb.QR_IMAGE_SVG),
        qr_png=req.qr_image in (pb.QR_IMAGE_UNSPECIFIED, pb.QR_IMAGE_PNG))


def challenge_command(req: pb.ChallengeRequest) -> ChallengeCommand:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    factor_id = c.resource_id("factor_id", req.factor_id)
    purpose = c.enum("purpose", req.purpose, PURPOSES, _PURPOSE_NAMES)
    application = c.enum("application", req.application, APPLICATIONS, _APP_NAMES)
    channel = c.optional_channel(req.channel)
    request_id = c.text("request_id", req.request_id, max_len=MAX_REQUEST_ID, required=False)
    c.text("session_token", req.session_token, max_len=MAX_TOKEN, required=False)
    c.done()
    assert purpose is not None and application is not None
    return ChallengeCommand(user_id=user_id, factor_id=factor_id, purpose=purpose,
                            application=application, channel=channel,
                            request_id=request_id or None, session_token=req.session_token)


def _proof(c: _Checker, code: str, webauthn_response: str) -> domain.Proof:
    """A code or a WebAuthn response, exactly one (which one the challenged factor
    wants is checked once the challenge is read: service/verification.py)."""
    if code and webauthn_response:
        c.bad("webauthn_response", "set either code or webauthn_response, not both")
    elif webauthn_response:
        if len(webauthn_response) > MAX_WEBAUTHN_RESPONSE:
            c.bad("webauthn_response", f"must be at most {MAX_WEBAUTHN_RESPONSE} characters")
    else:
        # Spaces are what people type around and inside codes; the factor module drops them.
        c.text("code", code, max_len=MAX_CODE, required=True, trim_ok=True)
    return domain.Proof(code=code, webauthn_response=webauthn_response)


@dataclass(frozen=True)
class VerifyArgs:
    challenge_id: str
    proof: domain.Proof
    user_id: str | None  # the user the caller expects, or None
    account_email: str | None
    open_session: bool = False
    remember_as: str | None = None  # remember_device: the browser's label


def verify_args(req: pb.VerifyRequest) -> VerifyArgs:
    c = _Checker()
    challenge_id = c.resource_id("challenge_id", req.challenge_id)
    proof = _proof(c, req.code, req.webauthn_response)
    user_id = c.user_id(req.user_id) if req.user_id else None
    c.audit_fields(req.client_ip, req.user_agent)
    account_email = c.account_email(req.account_email)
    remember_as = None
    if req.remember_device:
        remember_as = c.text("device_label", req.device_label, max_len=MAX_DEVICE_LABEL,
                             required=True)
    elif req.device_label:
        c.bad("device_label", "is only for remember_device")
    c.done()
    return VerifyArgs(challenge_id, proof, user_id, account_email, req.open_session,
                      remember_as)


@dataclass(frozen=True)
class DisableArgs:
    user_id: str
    factor_id: str
    challenge_id: str
    proof: domain.Proof
    account_email: str | None


def disable_args(req: pb.DisableRequest) -> DisableArgs:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    factor_id = c.resource_id("factor_id", req.factor_id)
    challenge_id = c.resource_id("challenge_id", req.challenge_id)
    proof = _proof(c, req.code, req.webauthn_response)
    c.audit_fields(req.client_ip, req.user_agent)
    account_email = c.account_email(req.account_email)
    c.done()
    return DisableArgs(user_id, factor_id, challenge_id, proof, account_email)


def session_token(value: str, field: str = "session_token") -> str:
    c = _Checker()
    c.text(field, value, max_len=MAX_TOKEN, required=True)
    c.done()
    return value


def check_session_args(req: pb.CheckSessionRequest) -> tuple[str, domain.Application]:
    token, application = req.session_token, APPLICATIONS.get(req.application)
    # CheckSession is the hottest call and nearly every request is well formed: the same
    # checks as ``_Checker.text`` and ``_Checker.enum`` in one look, without building a
    # checker. Anything else goes the long way, which says what is wrong.
    if (application is not None and 0 < len(token) <= MAX_TOKEN and token.isprintable()
            and token == token.strip()):
        return token, application
    return checked_session_args(req)


def checked_session_args(req: pb.CheckSessionRequest) -> tuple[str, domain.Application]:
    """``check_session_args`` the long way, field by field."""
    c = _Checker()
    token = c.text("session_token", req.session_token, max_len=MAX_TOKEN, required=True)
    application = c.enum("application", req.application, APPLICATIONS, _APP_NAMES)
    c.done()
    assert application is not None
    return token, application


@dataclass(frozen=True)
class RegenerateArgs:
    user_id: str
    proof_challenge_id: str
    application: domain.Application
    account_email: str | None


def regenerate_args(req: pb.RegenerateRecoveryCodesRequest) -> RegenerateArgs:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    # session_token is deprecated and ignored (a session alone never regenerates codes);
    # its shape is still checked so nothing odd reaches a log.
    c.text("session_token", req.session_token, max_len=MAX_TOKEN, required=False)
    proof = c.resource_id("proof_challenge_id", req.proof_challenge_id) if (
        req.proof_challenge_id) else ""
    application = c.enum("application", req.application, APPLICATIONS, _APP_NAMES)
    c.audit_fields(req.client_ip, req.user_agent)
    account_email = c.account_email(req.account_email)
    c.done()
    assert application is not None
    return RegenerateArgs(user_id, proof, application, account_email)


@dataclass(frozen=True)
class AuditQuery:
    user_id: str
    start: datetime | None
    end: datetime | None
    before_id: int | None
    limit: int


def audit_query(req: pb.ListAuditEventsRequest) -> AuditQuery:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    if req.page_size < 0 or req.page_size > MAX_PAGE:
        c.bad("page_size", f"must be 0-{MAX_PAGE} (0 means {DEFAULT_PAGE})")
    before_id = None
    if req.page_token:
        try:
            before_id = int(base64.urlsafe_b64decode(req.page_token.encode()).decode())
        except (ValueError, UnicodeDecodeError):
            before_id = 0
        # Event ids are positive BIGINTs: anything else cannot come from us (and 2**63
        # would overflow the driver, an INTERNAL that quotes the value).
        if not 0 < before_id <= MAX_INT64:
            c.bad("page_token", "must be a next_page_token from a previous answer")
            before_id = None
    start = c.timestamp("start_time", req.start_time) if req.HasField("start_time") else None
    end = c.timestamp("end_time", req.end_time) if req.HasField("end_time") else None
    if start and end and end <= start:
        c.bad("end_time", "must be after start_time")
    c.done()
    return AuditQuery(user_id, start, end, before_id, req.page_size or DEFAULT_PAGE)


def audit_response(events: list[domain.AuditEvent], limit: int) -> pb.ListAuditEventsResponse:
    """``events`` holds up to limit+1 rows: one more than asked means another page."""
    page = events[:limit]
    resp = pb.ListAuditEventsResponse(events=[pb.AuditEvent(
        event_id=e.event_id, occurred_at=timestamp(e.occurred_at), event=e.event,
        outcome=e.outcome, user_id=e.user_id or "", factor_id=e.factor_id or "",
        challenge_id=e.challenge_id or "", caller=e.caller,
        application=(APPLICATIONS_OUT[domain.Application(e.application)]
                     if e.application else pb.APPLICATION_UNSPECIFIED),
        client_ip=e.client_ip or "", user_agent=e.user_agent or "",
        detail={k: str(v) for k, v in e.detail.items()}) for e in page])
    if len(events) > limit:
        resp.next_page_token = base64.urlsafe_b64encode(
            str(page[-1].event_id).encode()).decode()
    return resp


def list_factors_args(req: pb.ListFactorsRequest) -> str:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    c.done()
    return user_id


@dataclass(frozen=True)
class RecognizeArgs:
    user_id: str
    token: str = field(repr=False)
    application: domain.Application


def recognize_args(req: pb.RecognizeDeviceRequest) -> RecognizeArgs:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    token = c.text("device_token", req.device_token, max_len=MAX_TOKEN, required=True)
    application = c.enum("application", req.application, APPLICATIONS, _APP_NAMES)
    c.audit_fields(req.client_ip, req.user_agent)
    c.done()
    assert application is not None
    return RecognizeArgs(user_id, token, application)


def list_devices_args(req: pb.ListDevicesRequest) -> str:
    c = _Checker()
    user_id = c.user_id(req.user_id)
    c.done()
    return user_id


def forget_device_args(req: pb.ForgetDeviceRequest) -> tuple[str, str]:
    """(user id, device id)."""
    c = _Checker()
    user_id = c.user_id(req.user_id)
    device_id = c.resource_id("device_id", req.device_id)
    c.audit_fields(req.client_ip, req.user_agent)
    c.done()
    return user_id, device_id


def revoke_target(req: pb.RevokeSessionRequest) -> tuple[domain.RevokeTarget, str, str]:
    """(SESSION_TOKEN, token, "") or (USER_ID, id, the token of the session to keep)."""
    which = req.WhichOneof("target")
    c = _Checker()
    keep = c.text("keep_session_token", req.keep_session_token, max_len=MAX_TOKEN,
                  required=False)
    if which == "session_token":
        value = c.text("session_token", req.session_token, max_len=MAX_TOKEN, required=True)
        if keep:
            c.bad("keep_session_token", "only with user_id: it keeps one of the user's "
                                        "sessions while the others end")
    elif which == "user_id":
        value = c.user_id(req.user_id)
    else:
        c.bad("target", "set session_token (one session) or user_id (all of a user's)")
        value = ""
    c.done()
    assert which is not None
    return domain.RevokeTarget(which), value, keep


# -- responses -------------------------------------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime | None) -> Timestamp | None:
    """An aware datetime as a Timestamp. Integer arithmetic on the microseconds since the
    epoch: the same value as ``Timestamp.FromDatetime``, in a third of its time (three of
    these are in every CheckSession answer). A naive datetime is UTC, as there."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    micros = (value - _EPOCH) // _MICROSECOND
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


def factor_pb(f: domain.Factor) -> pb.Factor:
    return pb.Factor(
        factor_id=f.factor_id, user_id=f.user_id, method=METHODS_OUT[f.method],
        status=STATUSES[f.status], masked_destination=f.masked_destination,
        created_at=timestamp(f.created_at), confirmed_at=timestamp(f.confirmed_at),
        last_used_at=timestamp(f.last_used_at), disabled_at=timestamp(f.disabled_at),
        established_at=timestamp(f.established_at if f.status is domain.FactorStatus.ACTIVE
                                 else None))


def enroll_response(r: EnrollResult) -> pb.EnrollResponse:
    resp = pb.EnrollResponse(
        factor=factor_pb(r.factor), challenge_id=r.challenge.challenge_id,
        expires_at=timestamp(r.challenge.expires_at), code_length=r.code_length)
    if r.provisioning is not None:
        resp.totp_secret = r.provisioning.secret_base32
        resp.otpauth_uri = r.provisioning.otpauth_uri
        resp.qr_svg = r.provisioning.qr_svg
        resp.qr_png = r.provisioning.qr_png
    if r.browser_options is not None:
        resp.webauthn_creation_options = r.browser_options
    return resp


def challenge_response(r: ChallengeResult) -> pb.ChallengeResponse:
    resp = pb.ChallengeResponse(
        challenge_id=r.challenge.challenge_id, method=METHODS_OUT[r.factor.method],
        channel=CHANNELS_OUT[r.challenge.channel],
        masked_destination=r.factor.masked_destination,
        expires_at=timestamp(r.challenge.expires_at),
        resend_available_at=timestamp(r.resend_available_at), code_length=r.code_length)
    if r.browser_options is not None:
        if r.challenge.purpose is domain.Purpose.CONFIRM_ENROLLMENT:
            resp.webauthn_creation_options = r.browser_options
        else:
            resp.webauthn_request_options = r.browser_options
    return resp


def session_pb(s: domain.Session, token: str = "") -> pb.Session:
    return pb.Session(
        session_token=token, user_id=s.user_id, method=METHODS_OUT[s.method],
        application=APPLICATIONS_OUT[s.application],
        authenticated_at=timestamp(s.authenticated_at), expires_at=timestamp(s.expires_at),
        idle_expires_at=timestamp(s.idle_expires_at))


def device_pb(d: domain.TrustedDevice) -> pb.TrustedDevice:
    return pb.TrustedDevice(
        device_id=d.device_id, user_id=d.user_id, label=d.label,
        application=APPLICATIONS_OUT[d.application], method=METHODS_OUT[d.method],
        created_at=timestamp(d.created_at), last_used_at=timestamp(d.last_used_at),
        expires_at=timestamp(d.expires_at), idle_expires_at=timestamp(d.idle_expires_at))


def verify_response(o: VerifyOutcome) -> pb.VerifyResponse:
    resp = pb.VerifyResponse(result=RESULTS[o.result], attempts_remaining=o.attempts_remaining,
                             recovery_codes=list(o.recovery_codes))
    if o.session is not None:
        resp.session.CopyFrom(session_pb(o.session.session, o.session.token))
    if o.factor is not None:
        resp.factor.CopyFrom(factor_pb(o.factor))
    if o.device is not None:
        resp.device_token = o.device.token
        resp.device.CopyFrom(device_pb(o.device.device))
    return resp


def recognize_response(found: tuple[domain.NewSession, domain.TrustedDevice] | None,
                       ) -> pb.RecognizeDeviceResponse:
    if found is None:
        return pb.RecognizeDeviceResponse(recognized=False)
    session, device = found
    return pb.RecognizeDeviceResponse(
        recognized=True, session=session_pb(session.session, session.token),
        device=device_pb(device))


def disable_response(o: VerifyOutcome) -> pb.DisableResponse:
    resp = pb.DisableResponse(result=RESULTS[o.result], attempts_remaining=o.attempts_remaining)
    if o.factor is not None:
        resp.factor.CopyFrom(factor_pb(o.factor))
    return resp


# CheckSession's answer for an unknown, revoked or expired token: shared, never changed.
INVALID_SESSION = pb.CheckSessionResponse(valid=False)


def check_session_response(s: domain.Session,
                           worth: SessionAssurance) -> pb.CheckSessionResponse:
    resp = pb.CheckSessionResponse(
        valid=True, user_id=s.user_id, method=METHODS_OUT[s.method],
        application=APPLICATIONS_OUT[s.application],
        authenticated_at=timestamp(s.authenticated_at), expires_at=timestamp(s.expires_at),
        idle_expires_at=timestamp(s.idle_expires_at))
    resp.amr.extend(worth.amr)
    resp.phishing_resistant = worth.phishing_resistant
    resp.trusted_device = worth.trusted_device
    resp.aal2 = worth.aal2
    return resp
