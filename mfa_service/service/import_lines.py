"""``mfa-service import``: one line of the file, read into what it asks for, or refused.

Pure functions that return values: no store, no keyring, no clock (``now`` is given).
A line is one JSON object naming one factor of one user (docs/OPERATIONS.md, "Importing
existing factors"):

- ``{"user_id", "method": "authenticator_app", "otpauth_uri"}``: the app's secret and its
  TOTP parameters, from the Key Uri Format (``otpauth://totp/LABEL?secret=...``);
- ``{"user_id", "method": "email", "email"}``: validated and normalised as Enroll does;
- ``{"user_id", "method": "phone", "phone_number", "channel"}``: likewise, E.164;
- optional on each: ``confirmed_at`` (RFC 3339, with an offset) and ``label``.

A refusal's reason never quotes a value from the line: a secret pasted into the wrong
field, or a whole otpauth URI, must not reach the terminal, a log or a ticket. Only field
names this module knows, and short tokens that cannot be secrets (an algorithm name, a
digit count), are named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote, unquote_plus

from mfa_service.domain import DEFAULT_TOTP, Channel, Method, TotpAlgorithm, TotpParameters
from mfa_service.errors import InvalidArgument
from mfa_service.factors.email_code import mask_email, normalise_email
from mfa_service.factors.phone_code import mask_phone, normalise_phone
from mfa_service.factors.totp import SUPPORTED_DIGITS, SUPPORTED_PERIODS

METHODS = {m.value: m for m in (Method.AUTHENTICATOR_APP, Method.EMAIL, Method.PHONE)}
COMMON_FIELDS = frozenset({"user_id", "method", "confirmed_at", "label"})
METHOD_FIELDS = {
    Method.AUTHENTICATOR_APP: frozenset({"otpauth_uri"}),
    Method.EMAIL: frozenset({"email"}),
    Method.PHONE: frozenset({"phone_number", "channel"}),
}
_DEFAULTS = (DEFAULT_TOTP.algorithm, DEFAULT_TOTP.digits, DEFAULT_TOTP.period)
_ALLOWED = {m: COMMON_FIELDS | fields for m, fields in METHOD_FIELDS.items()}
CHANNELS = {"sms": Channel.SMS, "voice": Channel.VOICE}
MAX_USER_ID = 128  # the column, and what the RPCs accept
MAX_LABEL = 128  # factors.label and factors.masked_destination
# What the store keeps of an address: it is the factor's label (128), shown masked, which
# is up to three characters longer (the RPCs' limit, transport/convert.py says more).
MAX_EMAIL = 125
MAX_PHONE = 32
MAX_URI = 4096
# RFC 4226 R6 asks for at least 128 bits, and enrolment makes 160. Apps set up by other
# systems commonly hold 80-bit secrets (16 base32 characters, the Google Authenticator
# era): refusing them would leave those users without their app, and 2^80 HMACs is still
# far beyond guessing. Below 80 bits a secret is refused.
MIN_SECRET_BYTES = 10
MAX_SECRET_BYTES = 128
_BASE32 = re.compile(r"[A-Z2-7]+=*")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,16}")  # a value short and plain enough to name
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")  # a field name worth naming back


@dataclass(frozen=True)
class ImportLine:
    """A line that asks for a factor the service can hold."""

    line: int
    user_id: str
    method: Method
    label: str  # factors.label
    masked: str  # what ListFactors shows (the masked address or number, the app's name)
    destination: str | None = None  # email address or E.164 number
    secret: bytes | None = field(default=None, repr=False)  # the app's TOTP secret
    totp: TotpParameters = DEFAULT_TOTP
    channel: Channel | None = None  # phone: the channel the old system used
    confirmed_at: datetime | None = None


@dataclass(frozen=True)
class LineRefused:
    """A line not imported, and why (never a value from it but those named above)."""

    line: int
    reason: str
    user_id: str | None = None
    masked: str | None = None  # the masked address or number, once known to be one


class _Refused(Exception):
    """Raised inside parse_line; becomes a LineRefused."""

    def __init__(self, reason: str, masked: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.masked = masked


def parse_line(line: int, raw: bytes, now: datetime) -> ImportLine | LineRefused | None:
    """Line number ``line`` of the file, read; None for a blank line (ignored)."""
    if not raw.strip():
        return None
    user_id: str | None = None
    try:
        obj = _json_object(raw)
        user_id = _user_id(obj)
        return _factor(line, obj, user_id, now)
    except _Refused as refused:
        return LineRefused(line, refused.reason, user_id, refused.masked)


def parse_lines(lines: Sequence[tuple[int, bytes]], now: datetime,
                ) -> list[ImportLine | LineRefused]:
    """``parse_line`` for each (number, bytes) of ``lines``, blank ones left out. Module
    level and pure, so a worker process can run it (service/importer.py)."""
    out: list[ImportLine | LineRefused] = []
    for number, raw in lines:
        parsed = parse_line(number, raw, now)
        if parsed is not None:
            out.append(parsed)
    return out


# A parsed line as a plain tuple: what crosses from a worker process. Unpickling a
# dataclass cost 6 µs, a tuple 0.5 µs; the parent process is the import's busiest.
Packed = tuple[Any, ...]


def parse_lines_packed(lines: Sequence[tuple[int, bytes]], now: datetime) -> list[Packed]:
    """``parse_lines``, each result ``pack``ed (a worker process's entry point)."""
    return [pack(parsed) for parsed in parse_lines(lines, now)]


def pack(parsed: ImportLine | LineRefused) -> Packed:
    if isinstance(parsed, LineRefused):
        return (parsed.line, parsed.reason, parsed.user_id, parsed.masked)
    t = parsed.totp
    return (parsed.line, parsed.user_id, parsed.method.value, parsed.label, parsed.masked,
            parsed.destination, parsed.secret,
            None if t is DEFAULT_TOTP else (t.algorithm.value, t.digits, t.period),
            parsed.channel.value if parsed.channel else None, parsed.confirmed_at)


def unpack(packed: Packed) -> ImportLine | LineRefused:
    if len(packed) == 4:
        line, reason, user_id, masked = packed
        return LineRefused(line, reason, user_id, masked)
    (line, user_id, method, label, masked, destination, secret, totp, channel,
     confirmed_at) = packed
    # Positional, and the enums from dicts: this runs once a line in the busiest process.
    return ImportLine(
        line, user_id, METHODS[method], label, masked, destination, secret,
        DEFAULT_TOTP if totp is None else TotpParameters(
            TotpAlgorithm(totp[0]), totp[1], totp[2]),
        CHANNELS[channel] if channel else None, confirmed_at)


def _json_object(raw: bytes) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("not UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # The decoder's message says what it expected and where, never the text itself.
        raise _Refused(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _Refused("not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _Refused("not a JSON object")
    return obj


def _string(obj: dict[str, object], name: str, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _Refused(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _Refused(f"{name} must be a string")
    if required and not value:
        raise _Refused(f"{name} is required")
    return value


def _user_id(obj: dict[str, object]) -> str:
    user_id = _string(obj, "user_id", required=True)
    assert user_id is not None
    if len(user_id) > MAX_USER_ID or not user_id.isprintable() or user_id != user_id.strip():
        raise _Refused(f"user_id must be 1-{MAX_USER_ID} printable characters without "
                       "outer spaces")
    return user_id


def _factor(line: int, obj: dict[str, object], user_id: str, now: datetime) -> ImportLine:
    name = _string(obj, "method", required=True)
    method = METHODS.get(name or "")
    if method is None:
        raise _Refused("method must be one of " + ", ".join(METHODS))
    allowed = _ALLOWED[method]
    if not obj.keys() <= allowed:
        unknown = sorted(set(obj) - allowed)
        named = [n for n in unknown if _NAME.fullmatch(n)]
        listed = ", ".join(named) if len(named) == len(unknown) else "a field"
        raise _Refused(f"unknown field for {method.value}: {listed}")
    confirmed_at = _confirmed_at(obj, now)
    label = _label(obj)
    if method is Method.AUTHENTICATOR_APP:
        return _app(line, obj, user_id, label, confirmed_at)
    if method is Method.EMAIL:
        return _email(line, obj, user_id, label, confirmed_at)
    return _phone(line, obj, user_id, label, confirmed_at)


def _confirmed_at(obj: dict[str, object], now: datetime) -> datetime | None:
    text = _string(obj, "confirmed_at", required=False)
    if text is None:
        return None
    try:
        # RFC 3339 is a profile of ISO 8601 that Python 3.11 reads, "Z" included.
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _Refused("confirmed_at is not an RFC 3339 date-time") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise _Refused("confirmed_at needs a time zone offset (e.g. 2024-05-01T12:00:00Z)")
    if value > now:
        raise _Refused("confirmed_at is in the future")
    return value


def _label(obj: dict[str, object]) -> str | None:
    label = _string(obj, "label", required=False)
    if label is None:
        return None
    _check_label(label, "label")
    return label


def _check_label(label: str, what: str) -> None:
    if not label or len(label) > MAX_LABEL or not label.isprintable() or label != label.strip():
        raise _Refused(f"{what} must be 1-{MAX_LABEL} printable characters without outer "
                       "spaces")


def _email(line: int, obj: dict[str, object], user_id: str, label: str | None,
           confirmed_at: datetime | None) -> ImportLine:
    raw = _string(obj, "email", required=True)
    assert raw is not None
    if len(raw) > MAX_EMAIL:
        raise _Refused(f"email must be at most {MAX_EMAIL} characters")
    address = _as_refusal(normalise_email, raw)
    if len(address) > MAX_EMAIL:  # normalisation may lengthen (IDNA)
        raise _Refused(f"email must be at most {MAX_EMAIL} characters")
    return ImportLine(line=line, user_id=user_id, method=Method.EMAIL, label=label or address,
                      masked=mask_email(address), destination=address,
                      confirmed_at=confirmed_at)


def _phone(line: int, obj: dict[str, object], user_id: str, label: str | None,
           confirmed_at: datetime | None) -> ImportLine:
    raw = _string(obj, "phone_number", required=True)
    assert raw is not None
    if len(raw) > MAX_PHONE:
        raise _Refused(f"phone_number must be at most {MAX_PHONE} characters")
    number = _as_refusal(normalise_phone, raw)
    masked = mask_phone(number)
    named = _string(obj, "channel", required=False)
    channel = CHANNELS.get((named or "sms").lower())
    if channel is None:
        raise _Refused("channel must be sms or voice", masked)
    return ImportLine(line=line, user_id=user_id, method=Method.PHONE, label=label or number,
                      masked=masked, destination=number, channel=channel,
                      confirmed_at=confirmed_at)


def _as_refusal(normalise: Callable[[str], str], raw: str) -> str:
    """Enrolment's own validation (factors/email_code.py, phone_code.py); its message
    names the field and what is wrong, never the value."""
    try:
        return normalise(raw)
    except InvalidArgument as exc:
        raise _Refused("; ".join(f"{v.field} {v.description}" for v in exc.violations)) from None


@dataclass(frozen=True)
class OtpauthUri:
    """What an otpauth URI says about a TOTP app."""

    secret: bytes = field(repr=False)
    parameters: TotpParameters
    account: str  # the label's account name ("" when none)


def parse_otpauth_uri(uri: str) -> OtpauthUri:
    """The Key Uri Format (``otpauth://totp/ISSUER:ACCOUNT?secret=BASE32&algorithm=SHA1&
    digits=6&period=30&issuer=ISSUER``), or ValueError with a reason that quotes none of
    it. Absent parameters are the format's defaults (SHA1, 6, 30).

    Split by hand rather than with urllib's urlsplit and parse_qsl: the format is that
    simple, and this runs once per line of files of millions of lines (it was a third of
    an app line's cost)."""
    if len(uri) > MAX_URI:
        raise ValueError(f"is longer than {MAX_URI} characters")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != "otpauth":
        raise ValueError("is not an otpauth:// URI")
    location, _, query = rest.partition("#")[0].partition("?")
    kind, _, path = location.partition("/")
    kind = kind.lower()
    if kind == "hotp":
        raise ValueError("is an HOTP (counter-based) app: only TOTP apps are supported")
    if kind != "totp":
        raise ValueError("must be otpauth://totp/...")
    params: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError("has a malformed query")
        key = key.lower()
        if key in params:
            raise ValueError(f"names {key} twice" if _NAME.fullmatch(key)
                             else "names a parameter twice")
        params[key] = unquote_plus(value) if "%" in value or "+" in value else value
    secret = _secret(params.get("secret"))
    algorithm = _algorithm(params.get("algorithm"))
    digits = _number(params.get("digits"), "digits", SUPPORTED_DIGITS)
    period = _number(params.get("period"), "period", SUPPORTED_PERIODS)
    parameters = (DEFAULT_TOTP if (algorithm, digits, period) == _DEFAULTS  # most apps
                  else TotpParameters(algorithm, digits, period))
    label = unquote(path) if "%" in path else path
    account = label.split(":", 1)[1] if ":" in label else label
    return OtpauthUri(secret=secret, parameters=parameters, account=account.strip())


def _secret(value: str | None) -> bytes:
    if not value:
        raise ValueError("has no secret")
    # Key Uri Format: base32 (RFC 4648) without padding; apps and exports also write it
    # in lower case, with padding, or in groups separated by spaces.
    text = value.replace(" ", "").upper()
    if not _BASE32.fullmatch(text):
        raise ValueError("has a secret that is not base32")
    text = text.rstrip("=")
    if len(text) % 8 not in _WHOLE_BYTES:
        raise ValueError("has a secret that is not base32")
    secret = b32decode_unpadded(text)
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"has a secret shorter than {MIN_SECRET_BYTES * 8} bits")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"has a secret longer than {MAX_SECRET_BYTES * 8} bits")
    return secret


# RFC 4648 base32 digits as int()'s base-32 digits: "A" is 0, ..., "7" is 31.
_AS_INT_DIGITS = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567",
                               "0123456789abcdefghijklmnopqrstuv")
# Characters in a last, partial 8-character group that can end on a byte boundary.
_WHOLE_BYTES = frozenset({0, 2, 4, 5, 7})


def b32decode_unpadded(text: str) -> bytes:
    """Base32 (RFC 4648: upper case, no padding, a length ``_WHOLE_BYTES`` allows) to
    bytes, as ``base64.b32decode`` of the padded text gives them (the bits after the last
    whole byte dropped), with one int() conversion: b32decode is written in Python and
    was a fifth of an app line's cost."""
    bits = 5 * len(text)
    return (int(text.translate(_AS_INT_DIGITS), 32) >> bits % 8).to_bytes(bits // 8, "big")


def _algorithm(value: str | None) -> TotpAlgorithm:
    if value is None:
        return TotpAlgorithm.SHA1
    try:
        return TotpAlgorithm(value.lower())
    except ValueError:
        named = f" {value}" if _TOKEN.fullmatch(value) else ""
        raise ValueError(f"algorithm{named} is not supported (SHA1, SHA256 or SHA512)") from None


def _number(value: str | None, name: str, allowed: tuple[int, ...]) -> int:
    if value is None:
        return allowed[0]
    if value.isascii() and value.isdigit() and len(value) <= 3 and int(value) in allowed:
        return int(value)
    named = f" {value}" if _TOKEN.fullmatch(value) else ""
    wanted = " or ".join(str(n) for n in allowed)
    raise ValueError(f"{name}{named} is not supported ({wanted})")


def _app(line: int, obj: dict[str, object], user_id: str, label: str | None,
         confirmed_at: datetime | None) -> ImportLine:
    uri = _string(obj, "otpauth_uri", required=True)
    assert uri is not None
    try:
        parsed = parse_otpauth_uri(uri)
    except ValueError as exc:
        raise _Refused(f"otpauth_uri {exc}") from None
    if label is None:
        # What ListFactors shows: the account name the app shows too, else (as Enroll
        # does without an account name) the user id.
        label = parsed.account or user_id
        _check_label(label, "the otpauth_uri's account name (give a label instead)")
    return ImportLine(line=line, user_id=user_id, method=Method.AUTHENTICATOR_APP, label=label,
                      masked=label, secret=parsed.secret, totp=parsed.parameters,
                      confirmed_at=confirmed_at)
