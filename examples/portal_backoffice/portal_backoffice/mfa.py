"""The one place both apps talk to mfa-service: the generated stubs, and what its answers
mean to a user (friendly messages chosen by the AIP-193 ErrorInfo reason, never the raw
status text or a stack trace)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from mfa_client import ErrorDetails, ErrorReason, channel_options, error_details

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub

# Deadlines: reads are quick; calls that write (and may queue a message) get more room.
READ_TIMEOUT = 3.0
WRITE_TIMEOUT = 8.0


class MfaError(Exception):
    """An mfa-service error, with the message to show the user."""

    def __init__(self, details: ErrorDetails) -> None:
        super().__init__(details.reason_name or details.code.name)
        self.details = details
        self.reason = details.reason

    @property
    def user_message(self) -> str:
        return explain(self.details)


def connect(target: str) -> tuple[aio.Channel, TwoFactorServiceAsyncStub]:
    """A channel to the service and its async stub.

    The demo talks plaintext to a development service on loopback. A real portal uses TLS
    and its caller token (see the root README, "Calling it from the portal"):
    ``aio.secure_channel(target, composite_credentials, options=channel_options())``.
    """
    channel = aio.insecure_channel(target, options=channel_options())
    stub: TwoFactorServiceAsyncStub = pb_grpc.TwoFactorServiceStub(channel)
    return channel, stub


def to_error(err: grpc.RpcError) -> MfaError:
    return MfaError(error_details(err))


def _wait_text(details: ErrorDetails) -> str:
    if details.retry_delay is None:
        return "a little while"
    seconds = max(1, math.ceil(details.retry_delay.total_seconds()))
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{math.ceil(seconds / 60)} minutes"


_FIELD_NAMES = {"email": "Email address", "phone_number": "Phone number",
                "code": "Code", "webauthn_response": "Passkey"}

_MESSAGES: dict[int, str] = {
    ErrorReason.ERROR_REASON_FACTOR_NOT_FOUND:
        "That sign-in method no longer exists. Reload the page and start again.",
    ErrorReason.ERROR_REASON_CHALLENGE_NOT_FOUND:
        "This verification step has expired. Start again.",
    ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH:
        "This verification step belongs to another action. Start again.",
    ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS:
        "That sign-in method is not ready for this. Reload the page and start again.",
    ErrorReason.ERROR_REASON_FACTOR_DISABLED:
        "That sign-in method has been turned off.",
    ErrorReason.ERROR_REASON_ALREADY_ENROLLED:
        "You already have this method turned on. Turn it off first to replace it.",
    ErrorReason.ERROR_REASON_NOT_SUPPORTED:
        "This method is not available on this server yet.",
    ErrorReason.ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED:
        "To change your phone number, first confirm a code sent to your current number "
        "(use \"Change number\" on your profile).",
    ErrorReason.ERROR_REASON_TOO_MANY_FACTORS:
        "You have too many sign-in methods. Remove one first.",
    ErrorReason.ERROR_REASON_RECENT_SESSION_REQUIRED:
        "For your security, confirm it's you with two-factor authentication first.",
    ErrorReason.ERROR_REASON_ADMIN_RESET_REQUIRED:
        "Too many wrong codes. Sign in with a recovery code, or contact support.",
    ErrorReason.ERROR_REASON_STORE_UNAVAILABLE:
        "Two-factor authentication is unavailable right now. Try again in a moment.",
    ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED:
        "Two-factor authentication took too long to answer. Try again.",
    ErrorReason.ERROR_REASON_REQUEST_ID_REUSED:
        "That request was already made. Reload the page.",
    ErrorReason.ERROR_REASON_PROOF_REQUIRED:
        "First confirm it's you with one of your sign-in methods. Start again.",
    ErrorReason.ERROR_REASON_ENROLLING_SESSION_ENDED:
        "You logged out while adding this method, so it was not added. Start again.",
    ErrorReason.ERROR_REASON_PHONE_BUDGET_EXHAUSTED:
        "We cannot send text messages or calls right now. Use another method, or try "
        "again tomorrow.",
}


def explain(details: ErrorDetails) -> str:
    """The sentence a user sees for an error (decided by the reason, never its text)."""
    reason = details.reason
    if reason == ErrorReason.ERROR_REASON_RESEND_COOLDOWN:
        return (f"A code was sent moments ago. Please wait {_wait_text(details)} "
                "before asking for a new one.")
    if reason == ErrorReason.ERROR_REASON_SEND_RATE_LIMITED:
        return f"Too many codes were sent recently. Try again in {_wait_text(details)}."
    if reason in (ErrorReason.ERROR_REASON_DESTINATION_RATE_LIMITED,
                  ErrorReason.ERROR_REASON_PHONE_AREA_RATE_LIMITED):
        return (f"Too many codes went to that address or number recently. Try again in "
                f"{_wait_text(details)}.")
    if reason == ErrorReason.ERROR_REASON_USER_LOCKED_OUT:
        return f"Too many wrong codes. Wait {_wait_text(details)} and try again."
    if reason == ErrorReason.ERROR_REASON_INVALID_REQUEST:
        if details.field_violations:
            parts = [f"{_FIELD_NAMES.get(v.field, v.field)}: {v.description}"
                     for v in details.field_violations]
            return "Please check your input. " + "; ".join(parts) + "."
        return "Please check your input."
    if reason == ErrorReason.ERROR_REASON_CREDENTIAL_TOO_NEW:
        moment = _parse_time(details.metadata.get("establishedAt", ""))
        since = f" from {fmt_day(moment)}" if moment else " in a day"
        return ("For your security, something added in the last day cannot remove or "
                f"replace what you had. You can do this{since}.")
    if reason in _MESSAGES:
        return _MESSAGES[reason]
    if details.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "Two-factor authentication is unavailable right now. Try again in a moment."
    # The reason name is logged (web.mfa_error_page), never shown: it means nothing to a user.
    return "Something went wrong with two-factor authentication. Try again."


def verify_message(result: pb.VerifyResult.ValueType, attempts_remaining: int,
                   method: pb.Method.ValueType) -> str:
    """What a refused code (or passkey) means to the user."""
    if result == pb.VERIFY_RESULT_INVALID_CODE:
        what = ("The passkey was not accepted." if method == pb.METHOD_PASSKEY
                else "That code is not right.")
        if attempts_remaining > 0:
            return (f"{what} {attempts_remaining} attempt"
                    f"{'s' if attempts_remaining != 1 else ''} left.")
        return f"{what} No attempts left: ask for a new code."
    if result == pb.VERIFY_RESULT_EXPIRED:
        return "The code expired. Ask for a new one."
    if result == pb.VERIFY_RESULT_MAX_ATTEMPTS_REACHED:
        return "Too many wrong attempts. Ask for a new code."
    if result == pb.VERIFY_RESULT_ALREADY_USED:
        return "This code was already used or replaced by a newer one. Ask for a new one."
    return "The code could not be checked. Try again."


METHOD_NAMES = {
    pb.METHOD_EMAIL: "Email",
    pb.METHOD_PHONE: "Phone",
    pb.METHOD_AUTHENTICATOR_APP: "Authenticator app",
    pb.METHOD_RECOVERY_CODE: "Recovery code",
    pb.METHOD_PASSKEY: "Passkey",
}
METHOD_SLUGS = {
    "email": pb.METHOD_EMAIL, "phone": pb.METHOD_PHONE, "app": pb.METHOD_AUTHENTICATOR_APP,
    "passkey": pb.METHOD_PASSKEY,
}
STATUS_NAMES = {
    # PENDING: started, never confirmed. Nothing resumes it (see portal.profile).
    pb.FACTOR_STATUS_PENDING: "Not finished", pb.FACTOR_STATUS_ACTIVE: "On",
    pb.FACTOR_STATUS_DISABLED: "Off",
}
CHANNELS = {"sms": pb.CHANNEL_SMS, "voice": pb.CHANNEL_VOICE}


def when(ts: Timestamp) -> datetime | None:
    """A proto timestamp as an aware datetime (None when unset)."""
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def fmt_moment(moment: datetime | None) -> str:
    """A time as people read it: "3 May 2025, 14:05 UTC" ("—" when unknown)."""
    if moment is None:
        return "—"
    moment = moment.astimezone(UTC)
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


def fmt_day(moment: datetime) -> str:
    return fmt_moment(moment)


def fmt_time(ts: Timestamp) -> str:
    return fmt_moment(when(ts))


def fmt_epoch(seconds: float) -> str:
    return fmt_moment(datetime.fromtimestamp(seconds, UTC)) if seconds else "—"


def browser_name(agent: str) -> str:
    """"Chrome on Linux" from a User-Agent header: enough for a user to recognise their
    own devices on "Your sessions" (a real portal may use a UA parser library)."""
    browser = next((name for key, name in (
        ("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"), ("Chrome/", "Chrome"),
        ("Chromium/", "Chromium"), ("Safari/", "Safari")) if key in agent), "")
    system = next((name for key, name in (
        ("Android", "Android"), ("iPhone", "iPhone"), ("iPad", "iPad"),
        ("Windows", "Windows"), ("Mac OS X", "macOS"), ("CrOS", "ChromeOS"),
        ("Linux", "Linux")) if key in agent), "")
    if "HeadlessChrome" in agent:
        browser = "Chrome (headless)"
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or "Unknown browser"


# The security activity list (ListAuditEvents): each event the user should recognise, in
# plain words. Events not listed here (a challenge opened, a session checked) are not shown.
_AUDIT_METHODS = {"email": "email", "phone": "phone", "authenticator_app": "authenticator app",
                  "recovery_code": "recovery code", "passkey": "passkey"}


def describe_event(event: pb.AuditEvent, methods: dict[str, str]) -> str | None:
    """One line for an audit event on the user's security activity page, or None.
    ``methods``: the user's factor ids and their method in words (from ListFactors)."""
    method = (_AUDIT_METHODS.get(event.detail.get("method", ""), "")
              or methods.get(event.factor_id, ""))
    ok = event.outcome == "ok"
    if event.event == "session_created" and "device_id" in event.detail:
        return "Logged in on a remembered browser, without a code"
    if event.event == "session_created":
        return f"Logged in with {method}" if method else "Logged in"
    if event.event == "verify" and event.outcome == "failed":
        return f"A wrong {'code' if method != 'passkey' else 'passkey'} was tried" + (
            f" ({method})" if method and method != "passkey" else "")
    if event.event == "factor_confirmed" and ok:
        return f"Turned on {method}" if method else "Turned on a sign-in method"
    if event.event == "factor_disabled" and ok:
        return f"Turned off {method}" if method else "Turned off a sign-in method"
    if event.event == "phone_changed" and ok:
        return "Changed the phone number"
    if event.event == "lockout":
        return "Too many wrong codes: sign-in was paused"
    if event.event == "recovery_code_used" and ok:
        return "Used a recovery code"
    if event.event == "recovery_codes_issued" and ok:
        return "Recovery codes were made"
    if event.event == "session_revoked":
        scope = event.detail.get("scope", "")
        return {"logout": "Logged out", "all_sessions": "Logged out everywhere",
                "factor_removed": "Logged out: the method used to log in was turned off",
                "device_forgotten": "Logged out: the remembered browser was forgotten",
                }.get(scope, "A session was ended")
    if event.event == "admin_reset":
        return "Support reset your two-factor authentication"
    if event.event == "device_remembered":
        return "A browser was remembered: it won't ask for a code"
    if event.event == "device_not_recognized" and event.detail.get("reason") == "unknown":
        return "A sign-in as a remembered browser was refused: it was not one of yours"
    if event.event == "device_forgotten":
        return {"forgotten": "A remembered browser was forgotten",
                "factor_changed": "Remembered browsers were forgotten: your sign-in "
                                  "methods changed",
                "all_sessions": "Remembered browsers were forgotten: signed out everywhere",
                "too_many": "Your oldest remembered browser was forgotten",
                }.get(event.detail.get("scope", ""), "A remembered browser was forgotten")
    return None
