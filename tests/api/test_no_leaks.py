"""No oracle, no leak (security hardening, item 8).

Every flow runs through the generated client against an in-process server whose
messages go to real edges (aiosmtpd and a local HTTP provider, never the console
sender, which prints codes by design). Meanwhile every log record of every logger is
captured at DEBUG and every span of the server's gRPC instrumentation is recorded.
Afterwards no one-time code, TOTP secret, session token or recovery code may appear in
a log line or record attribute, a span, anything the caller got back with an error,
the audit trail or any column of any table.

Spans and metrics: the server is built with ``Telemetry.create`` over an in-memory span
exporter and an in-memory metric reader (its own providers, never the global ones), so
every RPC span, SQL statement span, outbox send span and provider HTTP span, and every
metric data point's attributes, are scanned too.

Wrong, expired and used codes must look alike to a caller except for
``VerifyResult`` / ``attempts_remaining``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pyotp
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import inspect, literal_column, select, table
from sqlalchemy.ext.asyncio import AsyncEngine

from mfa_service import telemetry
from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.logs import JsonFormatter
from mfa_service.store.models import audit_events
from tests.support.client import AppFactor, login, regenerate_proof, rich_error, totp_at
from tests.support.config import TEST_KEYRING
from tests.support.fakes import RecordingHandler, http_server_running, smtp_server
from tests.support.rig import (
    CODE_RE,
    SPOKEN_CODE_RE,
    Rig,
    code_in,
    delivered_all,
    delivery_settings,
    enroll_email,
    enroll_phone,
    eventually,
    phone_text,
    unique_phone,
)

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

SERVICE = "/mfa.v1.TwoFactorService/"
RPCS = ("Enroll", "Challenge", "Verify", "Disable", "CheckSession", "ListFactors",
        "RevokeSession", "RegenerateRecoveryCodes", "ListAuditEvents", "RecognizeDevice",
        "ListDevices", "ForgetDevice")
# Loggers that are quiet or absent by default; set to DEBUG explicitly as well.
LOGGERS = ("mfa_service", "grpc", "sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool",
           "httpx", "httpcore", "aiosmtplib", "aiosqlite", "asyncpg", "asyncio", "alembic",
           "opentelemetry")
# aiosmtpd is the stand-in for the mail provider: it receives the code by design (its
# DEBUG log prints every DATA line), so its own log is not the service's log.
PROVIDER_LOGGERS = ("mail.log",)
AUDIT_IP = "203.0.113.7"
AUDIT_AGENT = "no-leaks-test/1.0"
MALFORMED_CODE = "12 34"  # 4 digits: cannot be a code of any factor of this service


# -- the secrets -----------------------------------------------------------------------------
# A code as written, grouped ("123 456", "123-456") or read out ("1, 2, 3, 4, 5, 6"), as a
# whole token: not inside a longer number, a UUID or a phone number.
_CODE_SHAPE = r"(?<![0-9A-Za-z])(?:\d{6,8}|\d{3,4}[ -]\d{3,4}|\d(?:, \d){5,7})(?![0-9A-Za-z])"
_CODE_SHAPE_TEXT = re.compile(_CODE_SHAPE)
_CODE_SHAPE_BYTES = re.compile(_CODE_SHAPE.encode())


@dataclass
class Secrets:
    """Everything that must never be seen outside the response that carried it.

    Numeric codes are short, so they match as a whole token only (not inside a longer
    number, a UUID or a phone number); the rest is long enough to match anywhere.
    """

    codes: dict[str, str] = field(default_factory=dict)  # digits -> what it is
    texts: dict[str, str] = field(default_factory=dict)  # lower-case text -> what it is
    raw: dict[bytes, str] = field(default_factory=dict)  # raw secret bytes -> what it is

    def code(self, code: str, what: str) -> None:
        assert code.isascii() and code.isdigit() and 6 <= len(code) <= 8, code
        self.codes.setdefault(code, what)

    def token(self, token: str, what: str) -> None:
        assert len(token) >= 40, "a session or device token has 256 bits"
        self.texts.setdefault(token.lower(), what)

    def recovery_code(self, code: str, what: str) -> None:
        assert re.fullmatch(r"[0-9a-z]{5}-[0-9a-z]{5}-[0-9a-z]{5}", code), code
        for form in (code, code.replace("-", ""), code.replace("-", " ")):
            self.texts.setdefault(form, what)

    def totp_secret(self, secret_b32: str, what: str) -> None:
        raw = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
        forms = (secret_b32, raw.hex(), base64.b64encode(raw).decode().rstrip("="),
                 base64.urlsafe_b64encode(raw).decode().rstrip("="))
        for form in forms:
            self.texts.setdefault(form.lower(), what)
        self.raw[raw] = what

    def totp_codes(self, secret_b32: str, start: datetime, end: datetime) -> None:
        """Every code the authenticator showed between ``start`` and ``end`` (+-1 step)."""
        totp = pyotp.TOTP(secret_b32)
        at = start - timedelta(seconds=30)
        while at <= end + timedelta(seconds=30):
            self.code(totp.at(at), "TOTP code")
            at += timedelta(seconds=30)

    def harvest_codes(self, texts: Iterable[str], what: str) -> int:
        """Codes as delivered (written, or read digit by digit in a voice call)."""
        found = 0
        for text in texts:
            for match in [*CODE_RE.findall(text), *SPOKEN_CODE_RE.findall(text)]:
                self.code(match.replace(", ", ""), what)
                found += 1
        return found

    def finder(self) -> Finder:
        return Finder(self)


class Finder:
    """Finds any form of any secret in a pile of text or bytes.

    Linear in the size of the pile: code-shaped tokens are looked up in a set; the longer
    secrets are searched with ``find`` (text forms case-insensitively, raw bytes exactly).
    """

    def __init__(self, secrets: Secrets) -> None:
        self._codes = dict(secrets.codes)
        self._texts = dict(secrets.texts)
        self._text_bytes = {form.encode(): what for form, what in secrets.texts.items()}
        self._raw = dict(secrets.raw)

    def find(self, value: str | bytes) -> list[str]:
        """``what it is: ...context...`` for every secret in ``value``."""
        found: list[tuple[str, int, int]] = []
        if isinstance(value, str):
            for m in _CODE_SHAPE_TEXT.finditer(value):
                found += self._code(re.sub(r"\D", "", m.group(0)), m.start(), m.end())
            found += _occurrences(value.lower(), self._texts)
        else:
            for mb in _CODE_SHAPE_BYTES.finditer(value):
                found += self._code(re.sub(rb"\D", b"", mb.group(0)).decode(), mb.start(),
                                    mb.end())
            found += _occurrences(value.lower(), self._text_bytes)
            found += _occurrences(value, self._raw)
        return [f"{what}: ...{value[max(0, start - 60):end + 60]!r}..."
                for what, start, end in found]

    def scan(self, where: str, values: Iterable[str | bytes]) -> list[str]:
        """Every hit in ``values`` (de-duplicated and joined first), labelled ``where``."""
        texts: set[str] = set()
        blobs: set[bytes] = set()
        for value in values:
            if isinstance(value, str):
                texts.add(value)
            else:
                blobs.add(bytes(value))
        hits = self.find("\n".join(texts)) + self.find(b"\n".join(blobs))
        return [f"{where}: {hit}" for hit in hits]

    def _code(self, digits: str, start: int, end: int) -> list[tuple[str, int, int]]:
        return [(self._codes[digits], start, end)] if digits in self._codes else []


def _occurrences(pile: Any, needles: Mapping[Any, str]) -> list[tuple[str, int, int]]:
    out = []
    for needle, what in needles.items():
        at = pile.find(needle)
        while at != -1:
            out.append((what, at, at + len(needle)))
            at = pile.find(needle, at + 1)
    return out


def leaves(value: object, depth: int = 0) -> Iterator[str | bytes]:
    """Every string and byte string inside ``value`` (records, rows, containers)."""
    if isinstance(value, str | bytes):
        yield value
    elif isinstance(value, bytearray | memoryview):
        yield bytes(value)
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        yield str(value)  # a code passed as a number still counts
    elif depth > 4:
        yield repr(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from leaves(k, depth + 1)
            yield from leaves(v, depth + 1)
    elif isinstance(value, Sequence | set | frozenset):
        for item in value:
            yield from leaves(item, depth + 1)
    else:
        yield repr(value)
        # Wrappers (SQLAlchemy's parameter and row reprs truncate): look inside too.
        attrs: dict[str, object] = dict(getattr(value, "__dict__", {}))
        for cls in type(value).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if isinstance(name, str) and hasattr(value, name):
                    attrs[name] = getattr(value, name)
        for v in attrs.values():
            if isinstance(v, str | bytes | bytearray | memoryview | Mapping | Sequence):
                yield from leaves(v, depth + 1)


# -- what the service emits: logs, spans, answers --------------------------------------------
@dataclass(frozen=True)
class LogEntry:
    logger: str
    values: list[str | bytes]


class CapturingHandler(logging.Handler):
    """Keeps each record as the JSON line the service prints, plus its raw values."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.entries: list[LogEntry] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as exc:  # still scan what there is
            line = f"unformattable record ({exc!r}): {record.__dict__!r}"
        self.entries.append(LogEntry(record.name, [line, *leaves(record.__dict__)]))


@pytest.fixture
def captured_logs() -> Iterator[CapturingHandler]:
    """Every record of every logger at DEBUG, to a handler on the root logger."""
    handler = CapturingHandler()
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in LOGGERS] + [
        lg for lg in list(logging.root.manager.loggerDict.values())
        if isinstance(lg, logging.Logger)]
    saved = {lg: (lg.level, lg.disabled, lg.propagate) for lg in loggers}
    saved_root = root.level
    for lg in saved:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        lg.propagate = True
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for lg, (level, disabled, propagate) in saved.items():
            lg.setLevel(level)
            lg.disabled = disabled
            lg.propagate = propagate


@pytest.fixture
def recorded_spans() -> InMemorySpanExporter:
    """Every span of the server built in this test (see the module doc)."""
    return InMemorySpanExporter()


class CallRecorder(aio.UnaryUnaryClientInterceptor):
    """Client side: keeps every call, so every status, message and trailer is checked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        call = await continuation(client_call_details, request)
        method = client_call_details.method
        self.calls.append((method.decode() if isinstance(method, bytes) else str(method), call))
        return call

    async def answers(self) -> list[tuple[str, grpc.StatusCode, list[str | bytes]]]:
        """(method, status code, everything the caller got besides the response body)."""
        out = []
        for method, call in self.calls:
            code: grpc.StatusCode = await call.code()
            seen: list[str | bytes] = [await call.details() or ""]
            for key, value in [*(await call.initial_metadata() or ()),
                               *(await call.trailing_metadata() or ())]:
                seen += [key, value]
                if key == "grpc-status-details-bin":
                    seen += status_texts(status_pb2.Status.FromString(value))
            out.append((method, code, seen))
        return out


def status_texts(status: status_pb2.Status) -> list[str | bytes]:
    """google.rpc.Status: its message and every detail, unpacked."""
    texts: list[str | bytes] = [status.message, str(status)]
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                unpacked: Message = cls()
                detail.Unpack(unpacked)
                texts.append(str(unpacked))
        texts.append(detail.value)
    return texts


@dataclass
class LeakRig:
    rig: Rig
    recorder: CallRecorder
    logs: CapturingHandler
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    @property
    def stub(self) -> Stub:
        return self.rig.stub

    @property
    def clock(self) -> FixedClock:
        return self.rig.clock

    @property
    def app(self) -> App:
        return self.rig.app


@pytest.fixture
async def leak_rig(database_url: str, fresh_clock: FixedClock,
                   captured_logs: CapturingHandler,
                   recorded_spans: InMemorySpanExporter) -> AsyncIterator[LeakRig]:
    """Capture first, then the edges, then the server (real SMTP + webhook senders).

    The server's own dispatcher task and health probe are off: ``App.stop`` cancels
    them, and on SQLite a task cancelled inside its BEGIN IMMEDIATE transaction can leave
    the write lock behind (the next test's ``create_server`` then failed with "database
    is locked"). The same ``app.dispatcher`` runs here instead, stopped between passes.
    """
    handler = RecordingHandler()
    with smtp_server(handler) as smtp_port:
        async with http_server_running() as provider:
            settings = delivery_settings(database_url, smtp_port, provider,
                                         outbox_dispatcher=False, health_probe_seconds=300)
            metric_reader = InMemoryMetricReader()
            app = await create_server(
                settings, clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING),
                observability=telemetry.Telemetry.create(
                    span_processors=[SimpleSpanProcessor(recorded_spans)],
                    metric_readers=[metric_reader]))
            assert (settings.email_provider, settings.phone_provider) == ("smtp", "webhook")
            stop = asyncio.Event()

            async def dispatch() -> None:
                while not stop.is_set():
                    while await app.dispatcher.run_once():
                        pass
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=0.02)

            dispatcher = asyncio.create_task(dispatch())
            recorder = CallRecorder()
            channel = aio.insecure_channel(f"127.0.0.1:{app.port}", interceptors=[recorder])

            async def no_restart(**_: Any) -> App:
                raise AssertionError("not used here")

            stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
            try:
                yield LeakRig(Rig(app, stub, fresh_clock, handler, provider, no_restart),
                              recorder, captured_logs, recorded_spans, metric_reader)
            finally:
                stop.set()
                await dispatcher
                await channel.close()
                await app.stop(0)


# -- helpers ---------------------------------------------------------------------------------
def wrong_totp(secret: str, clock: FixedClock) -> str:
    """A code that matches no step in the verification window."""
    near = {totp_at(secret, clock, steps) for steps in (-2, -1, 0, 1, 2)}
    candidate = int(totp_at(secret, clock))
    while f"{candidate:06d}" in near or f"{candidate:06d}" == "000000":
        candidate = (candidate + 7919) % 1_000_000
    return f"{candidate:06d}"


async def enroll_app(lr: LeakRig, user_id: str, s: Secrets) -> tuple[AppFactor, list[str]]:
    """Enrol and confirm an authenticator app (one wrong code first); returns the factor
    and the first recovery codes."""
    resp = await lr.stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL, account_name=f"{user_id}@example.com"))
    s.totp_secret(resp.totp_secret, f"TOTP secret of {user_id}")
    wrong = wrong_totp(resp.totp_secret, lr.clock)
    s.code(wrong, "a wrong TOTP code the user typed")
    first = await lr.stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id, code=wrong))
    assert first.result == pb.VERIFY_RESULT_INVALID_CODE
    right = totp_at(resp.totp_secret, lr.clock)
    ok = await lr.stub.Verify(pb.VerifyRequest(
        challenge_id=resp.challenge_id, code=f" {right[:3]} {right[3:]} ",
        client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    assert len(ok.recovery_codes) == 10
    for code in ok.recovery_codes:
        s.recovery_code(code, f"recovery code of {user_id}")
    lr.clock.advance(30)
    factor = AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)
    lr.rig.app_factors[user_id] = factor  # the rig steps up with it before adding a factor
    return factor, list(ok.recovery_codes)


async def app_login(lr: LeakRig, factor: AppFactor, s: Secrets, what: str) -> pb.Session:
    session = await login(lr.stub, factor, lr.clock)
    s.token(session.session_token, what)
    return session


async def recovery_factor_id(stub: Stub, user_id: str) -> str:
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    [factor_id] = [f.factor_id for f in listed.factors if f.method == pb.METHOD_RECOVERY_CODE
                   and f.status == pb.FACTOR_STATUS_ACTIVE]
    return factor_id


# -- the oracle cases ------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What a caller can tell apart: status, message texts, which response fields are set."""

    code: grpc.StatusCode
    details: str
    status_message: str | None
    reason: str | None
    field_violations: tuple[tuple[str, str], ...]
    trailer_keys: tuple[str, ...]
    result: int = 0
    attempts_remaining: int = 0
    other_fields: tuple[str, ...] = ()

    def looks_like(self) -> tuple[object, ...]:
        """Everything except the precise reason (VerifyResult, attempts_remaining)."""
        return (self.code, self.details, self.status_message, self.reason,
                self.field_violations, self.trailer_keys, self.other_fields)


async def answer(call: Any) -> Answer:
    """Await a unary call and describe its outcome (an error is an outcome too)."""
    try:
        resp = await call
    except aio.AioRpcError:
        resp = None
    code: grpc.StatusCode = await call.code()
    details: str = await call.details() or ""
    trailers = list(await call.trailing_metadata() or ())
    keys = tuple(sorted(k for k, _ in trailers))
    if resp is None:
        [blob] = [v for k, v in trailers if k == "grpc-status-details-bin"]
        status = status_pb2.Status.FromString(blob)
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        for d in status.details:
            if d.Is(info.DESCRIPTOR):
                d.Unpack(info)
            elif d.Is(bad.DESCRIPTOR):
                d.Unpack(bad)
        return Answer(code, details, status.message, info.reason,
                      tuple((v.field, v.description) for v in bad.field_violations), keys)
    others = tuple(sorted(f.name for f, _ in resp.ListFields()
                          if f.name not in ("result", "attempts_remaining")))
    return Answer(code, details, None, None, (), keys, resp.result, resp.attempts_remaining,
                  others)


@dataclass
class OracleCases:
    verify: dict[str, Answer] = field(default_factory=dict)
    verify_malformed: dict[str, Answer] = field(default_factory=dict)
    disable: dict[str, Answer] = field(default_factory=dict)
    disable_malformed: dict[str, Answer] = field(default_factory=dict)
    change_proof: dict[str, Answer] = field(default_factory=dict)


async def oracle_cases(lr: LeakRig, user_id: str, s: Secrets) -> OracleCases:
    """A wrong code, an expired challenge and a used challenge: by Verify and by Disable
    (then a malformed code on each of those challenges), and as the proof of a phone
    change (Enroll)."""
    factor, _ = await enroll_app(lr, user_id, s)
    stub, clock, rig = lr.stub, lr.clock, lr.rig
    cases = OracleCases()

    # Phone change proofs: wrong code typed / approved too long ago / already used.
    phone_id, number = await enroll_phone(rig, user_id)

    async def proof() -> tuple[str, str]:
        before = len(rig.calls_to(number))
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_CHANGE_PHONE,
            application=pb.APPLICATION_PORTAL))
        sms = (await eventually(lambda: rig.calls_to(number)[before:]))[0]
        return ch.challenge_id, code_in(phone_text(sms))

    async def change(proof_id: str, new_number: str) -> Any:
        session = await app_login(lr, factor, s, "session token (step-up)")
        return stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_PHONE, phone_number=new_number,
            application=pb.APPLICATION_PORTAL, change_proof_challenge_id=proof_id,
            session_token=session.session_token))

    proof_id, right = await proof()
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    s.code(wrong, "a wrong SMS code the user typed")
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=proof_id, code=wrong))
            ).result == pb.VERIFY_RESULT_INVALID_CODE
    cases.change_proof["wrong"] = await answer(await change(proof_id, unique_phone()))
    clock.advance(31)
    proof_id, right = await proof()
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=proof_id, code=right))
            ).result == pb.VERIFY_RESULT_APPROVED
    clock.advance(10 * 60 + 1)
    cases.change_proof["expired"] = await answer(await change(proof_id, unique_phone()))
    proof_id, right = await proof()
    assert (await stub.Verify(pb.VerifyRequest(challenge_id=proof_id, code=right))
            ).result == pb.VERIFY_RESULT_APPROVED
    await enroll_phone(rig, user_id, unique_phone(), proof=proof_id)
    cases.change_proof["used"] = await answer(await change(proof_id, unique_phone()))

    # Verify and Disable on the authenticator app.
    async def challenge(purpose: pb.Purpose.ValueType) -> str:
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=purpose,
            application=pb.APPLICATION_PORTAL))
        return ch.challenge_id

    def verify(challenge_id: str, code: str) -> Any:
        return stub.Verify(pb.VerifyRequest(challenge_id=challenge_id, code=code,
                                            client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))

    def disable(challenge_id: str, code: str) -> Any:
        return stub.Disable(pb.DisableRequest(
            user_id=user_id, factor_id=factor.factor_id, challenge_id=challenge_id, code=code,
            client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))

    for purpose, call, results, malformed in (
            (pb.PURPOSE_LOGIN, verify, cases.verify, cases.verify_malformed),
            (pb.PURPOSE_DISABLE, disable, cases.disable, cases.disable_malformed)):
        wrong_id = await challenge(purpose)
        wrong = wrong_totp(factor.secret, clock)
        s.code(wrong, "a wrong TOTP code the user typed")
        results["wrong"] = await answer(call(wrong_id, wrong))
        malformed["wrong"] = await answer(call(wrong_id, MALFORMED_CODE))

        expired_id = await challenge(purpose)
        clock.advance(5 * 60 + 1)
        results["expired"] = await answer(call(expired_id, totp_at(factor.secret, clock)))
        malformed["expired"] = await answer(call(expired_id, MALFORMED_CODE))

        used_id = await challenge(purpose)
        approved = await call(used_id, totp_at(factor.secret, clock))
        assert approved.result == pb.VERIFY_RESULT_APPROVED
        if isinstance(approved, pb.VerifyResponse):
            s.token(approved.session.session_token, "session token (oracle login)")
        clock.advance(30)  # a fresh, right code: only the challenge is used
        results["used"] = await answer(call(used_id, totp_at(factor.secret, clock)))
        malformed["used"] = await answer(call(used_id, MALFORMED_CODE))
        clock.advance(30)
    return cases


# -- every flow ------------------------------------------------------------------------------
async def every_flow(lr: LeakRig, user_id: str, s: Secrets) -> None:
    stub, clock, rig = lr.stub, lr.clock, lr.rig

    # Authenticator app: enrol (one wrong code first) and confirm; log in; check.
    app_factor, first_codes = await enroll_app(lr, user_id, s)
    app_session = await app_login(lr, app_factor, s, "session token (app login)")
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=app_session.session_token, application=pb.APPLICATION_BACKOFFICE))
    assert check.valid and check.user_id == user_id

    # Remembered browsers: remember two on app logins, recognise one (and its session),
    # a forged token, the token for another user and on the other application; list;
    # forget one (the other is forgotten by the email factor added below).
    devices = []
    for label in ("Chrome on Linux", "Firefox on Windows"):
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=app_factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        remembered = await stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(app_factor.secret, clock),
            remember_device=True, device_label=label, client_ip=AUDIT_IP,
            user_agent=AUDIT_AGENT))
        s.token(remembered.device_token, f"device token ({label})")
        s.token(remembered.session.session_token, f"session token (remembering {label})")
        devices.append(remembered)
        clock.advance(30)
    recognized = await stub.RecognizeDevice(pb.RecognizeDeviceRequest(
        user_id=user_id, device_token=devices[0].device_token,
        application=pb.APPLICATION_PORTAL, client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    assert recognized.recognized
    s.token(recognized.session.session_token, "session token (remembered browser)")
    assert (await stub.CheckSession(pb.CheckSessionRequest(
        session_token=recognized.session.session_token,
        application=pb.APPLICATION_PORTAL))).trusted_device
    forged_token = base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
    s.token(forged_token, "a forged device token")
    for who, token_, application in (
            (user_id, forged_token, pb.APPLICATION_PORTAL),
            (f"{user_id}-elsewhere", devices[0].device_token, pb.APPLICATION_PORTAL),
            (user_id, devices[1].device_token, pb.APPLICATION_BACKOFFICE)):
        assert not (await stub.RecognizeDevice(pb.RecognizeDeviceRequest(
            user_id=who, device_token=token_, application=application,
            client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))).recognized
    listed_devices = await stub.ListDevices(pb.ListDevicesRequest(user_id=user_id))
    assert len(listed_devices.devices) == 2
    await stub.ForgetDevice(pb.ForgetDeviceRequest(
        user_id=user_id, device_id=devices[0].device.device_id, client_ip=AUDIT_IP,
        user_agent=AUDIT_AGENT))

    # Email: enrol and confirm, log in, type the used code again.
    email_id, address = await enroll_email(rig, user_id)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=email_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    code = code_in((await eventually(lambda: rig.mails_to(address)[1:]))[0].get_content())
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code,
                                            client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    s.token(ok.session.session_token, "session token (email login)")
    again = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
    assert again.result == pb.VERIFY_RESULT_ALREADY_USED
    clock.advance(31)

    # Phone: enrol by SMS, log in by voice.
    phone_id, number = await enroll_phone(rig, user_id)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_LOGIN,
        channel=pb.CHANNEL_VOICE, application=pb.APPLICATION_BACKOFFICE))
    call = (await eventually(lambda: rig.calls_to(number)[1:]))[0]
    spoken = SPOKEN_CODE_RE.search(phone_text(call))
    assert spoken is not None
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                            code=spoken.group(0).replace(", ", "")))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    s.token(ok.session.session_token, "session token (voice login)")
    clock.advance(31)

    # Phone change: the old number approves, the new one is enrolled with that proof.
    proof = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=phone_id, purpose=pb.PURPOSE_CHANGE_PHONE,
        application=pb.APPLICATION_PORTAL))
    sms = (await eventually(lambda: rig.calls_to(number)[2:]))[0]
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=proof.challenge_id,
                                            code=code_in(phone_text(sms))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    clock.advance(31)
    new_phone_id, _ = await enroll_phone(rig, user_id, unique_phone(), proof=proof.challenge_id)

    # Email: disable with a code mailed for that.
    off = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=email_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    code = code_in((await eventually(lambda: rig.mails_to(address)[2:]))[0].get_content())
    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=email_id, challenge_id=off.challenge_id, code=code,
        client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    assert done.factor.status == pb.FACTOR_STATUS_DISABLED
    clock.advance(31)

    # Recovery codes: log in with one (typed loosely), disable the phone with another.
    recovery_id = await recovery_factor_id(stub, user_id)
    rc = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(
        challenge_id=rc.challenge_id, code=first_codes[0].upper().replace("-", " ")))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    s.token(ok.session.session_token, "session token (recovery-code login)")
    dc = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    done = await stub.Disable(pb.DisableRequest(
        user_id=user_id, factor_id=new_phone_id, challenge_id=dc.challenge_id,
        code=first_codes[1], client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    assert (done.result, done.factor.status) == (pb.VERIFY_RESULT_APPROVED,
                                                 pb.FACTOR_STATUS_DISABLED)

    # New recovery codes proven with the (established) app; an old code is dead, a new
    # one works.
    fresh = await app_login(lr, app_factor, s, "session token (fresh app login)")
    regenerated = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, proof_challenge_id=await regenerate_proof(stub, app_factor, clock),
        application=pb.APPLICATION_PORTAL, client_ip=AUDIT_IP, user_agent=AUDIT_AGENT))
    new_codes = list(regenerated.recovery_codes)
    assert len(new_codes) == 10 and not set(new_codes) & set(first_codes)
    for code in new_codes:
        s.recovery_code(code, f"regenerated recovery code of {user_id}")
    rc = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    old = await stub.Verify(pb.VerifyRequest(challenge_id=rc.challenge_id, code=first_codes[2]))
    assert old.result == pb.VERIFY_RESULT_INVALID_CODE
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=rc.challenge_id, code=new_codes[0]))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    s.token(ok.session.session_token, "session token (new recovery-code login)")

    # Logout of one session, then of all.
    revoked = await stub.RevokeSession(pb.RevokeSessionRequest(
        session_token=app_session.session_token))
    assert revoked.revoked_count == 1
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=app_session.session_token, application=pb.APPLICATION_PORTAL))
    assert not check.valid
    revoked = await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id))
    assert revoked.revoked_count >= 1

    # Bad requests with a secret in the wrong place: refused without echoing it.
    token, secret, rcode = fresh.session_token, app_factor.secret, new_codes[1]
    device_token = devices[1].device_token
    app_ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=app_factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    code = totp_at(secret, clock)
    bad_calls: list[Any] = [
        stub.ListFactors(pb.ListFactorsRequest(user_id=token + " ")),
        stub.RevokeSession(pb.RevokeSessionRequest(user_id=token + " ")),
        stub.CheckSession(pb.CheckSessionRequest(session_token=token + " ",
                                                 application=pb.APPLICATION_PORTAL)),
        stub.RevokeSession(pb.RevokeSessionRequest(session_token=token * 7)),
        stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
            user_id=token + " ", session_token=token, client_ip=rcode)),
        stub.Verify(pb.VerifyRequest(challenge_id=token, code=code, user_agent="\n" + rcode)),
        stub.Verify(pb.VerifyRequest(challenge_id=app_ch.challenge_id, code=token * 2)),
        stub.Verify(pb.VerifyRequest(challenge_id=app_ch.challenge_id, code=secret)),
        stub.Verify(pb.VerifyRequest(challenge_id=app_ch.challenge_id, code=rcode)),
        stub.Disable(pb.DisableRequest(user_id=token + " ", factor_id=rcode,
                                       challenge_id=token, code=secret)),
        stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_EMAIL, email=token,
                                     application=pb.APPLICATION_PORTAL)),
        stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_PHONE,
                                     phone_number=rcode, application=pb.APPLICATION_PORTAL)),
        stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
                                     account_name=f"{secret}:{rcode}",
                                     application=pb.APPLICATION_PORTAL)),
        stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=app_factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL, request_id=token + " ")),
        stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=token + " ", page_token=token)),
        stub.RecognizeDevice(pb.RecognizeDeviceRequest(
            user_id=device_token + " ", device_token=device_token * 7,
            application=pb.APPLICATION_PORTAL, client_ip=device_token)),
        stub.Verify(pb.VerifyRequest(challenge_id=app_ch.challenge_id, code=code,
                                     remember_device=True, device_label=device_token * 2)),
        stub.Verify(pb.VerifyRequest(challenge_id=app_ch.challenge_id, code=code,
                                     device_label=device_token)),
        stub.ForgetDevice(pb.ForgetDeviceRequest(user_id=user_id, device_id=device_token)),
        stub.ListDevices(pb.ListDevicesRequest(user_id=device_token + " ")),
    ]
    for bad in bad_calls:
        with pytest.raises(aio.AioRpcError) as err:
            await bad
        assert rich_error(err.value).code == grpc.StatusCode.INVALID_ARGUMENT, err.value


# -- where secrets must not be ---------------------------------------------------------------
async def database_cells(engine: AsyncEngine) -> dict[str, list[object]]:
    """Every value of every row of every table, as the driver returns it."""
    async with engine.connect() as conn:
        names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names())
        out: dict[str, list[object]] = {}
        for name in names:
            rows: Sequence[Any] = (await conn.execute(
                select(literal_column("*")).select_from(table(name)))).all()
            out[name] = [value for row in rows for value in row]
    return out


async def test_no_code_secret_token_or_recovery_code_leaks(
        leak_rig: LeakRig, user_id: str) -> None:
    lr, s = leak_rig, Secrets()
    oracle_user = f"{user_id}-oracle"
    started = lr.clock.now()
    await every_flow(lr, user_id, s)
    await oracle_cases(lr, oracle_user, s)
    listed = {u: await lr.stub.ListAuditEvents(pb.ListAuditEventsRequest(
        user_id=u, page_size=500)) for u in (user_id, oracle_user)}
    for u in (user_id, oracle_user):
        await delivered_all(lr.rig, u)

    # Codes as the edges received them, and every TOTP code of the test's time span.
    mails = [m.get_content() for m in lr.rig.smtp.messages()]
    texts = [phone_text(r) for r in lr.rig.provider.requests]
    assert s.harvest_codes(mails, "emailed code") >= 3
    assert s.harvest_codes(texts, "SMS/voice code") >= 5
    for raw in list(s.raw):
        s.totp_codes(base64.b32encode(raw).decode().rstrip("="), started, lr.clock.now())
    assert len(s.texts) > 40 and len(s.codes) > 20
    finder = s.finder()
    piles: dict[str, list[str | bytes]] = defaultdict(list)  # where -> what was there

    # 1. Logs: every record of every logger, formatted and raw.
    entries = [e for e in lr.logs.entries if not e.logger.startswith(PROVIDER_LOGGERS)]
    assert any(e.logger == "mfa_service.rpc" for e in entries)
    assert any(e.logger.startswith("mfa_service.delivery") for e in entries)
    assert any(e.logger.startswith("sqlalchemy.engine") for e in entries)
    for e in entries:
        piles[f"log {e.logger}"] += e.values

    # 2. Spans: one per RPC, names, attributes, events, status.
    spans = lr.spans.get_finished_spans()
    assert {SERVICE + rpc for rpc in RPCS} <= {sp.name for sp in spans}
    for sp in spans:
        piles[f"span {sp.name}"] += [
            sp.to_json(), sp.name, *leaves(dict(sp.attributes or {})),
            sp.status.description or "",
            *(v for ev in sp.events for v in [ev.name, *leaves(dict(ev.attributes or {}))])]

    # SQL statements, outbox sends and provider requests are spans of their own.
    kinds = {sp.name for sp in spans}
    assert "outbox send" in kinds and "POST" in kinds, kinds
    assert any(sp.parent is not None and (sp.attributes or {}).get("db.system")
               for sp in spans)
    # Metric data points: their attributes, names and values.
    data = lr.metrics.get_metrics_data()
    assert data is not None
    piles["metrics"] += [data.to_json()]

    # 3. What callers got back besides response bodies: status, message, trailers.
    answers = await lr.recorder.answers()
    assert sum(code == grpc.StatusCode.INVALID_ARGUMENT for _, code, _ in answers) >= 15
    for method, code, seen in answers:
        piles[f"answer to {method} ({code.name})"] += seen

    # 4. The audit trail, as read through the API and as stored.
    for resp in listed.values():
        events = {e.event for e in resp.events}
        assert {"verify", "session_created", "recovery_codes_issued"} <= events, events
        piles["ListAuditEvents"] += [str(resp), resp.SerializeToString()]
    assert {"recovery_code_used", "session_revoked", "factor_disabled", "phone_changed",
            "device_remembered", "device_recognized", "device_not_recognized",
            "device_forgotten"} <= {e.event for e in listed[user_id].events}
    async with lr.app.database.engine.connect() as conn:
        rows = (await conn.execute(select(audit_events).where(
            audit_events.c.user_id.in_(list(listed))))).all()
    assert len(rows) >= len(listed[user_id].events)
    for row in rows:
        piles["audit_events rows"] += leaves(tuple(row))

    # 5. Every table, text and binary columns alike.
    cells = await database_cells(lr.app.database.engine)
    assert {"factors", "challenges", "sessions", "outbox", "recovery_codes", "audit_events",
            "user_lockouts", "trusted_devices", "device_misses"} <= set(cells)
    assert any(isinstance(v, bytes | memoryview) for values in cells.values() for v in values)
    for name, values in cells.items():
        piles[f"table {name}"] += (leaf for v in values for leaf in leaves(v))

    leaks = [hit for where, pile in piles.items() for hit in finder.scan(where, pile)]
    assert not leaks, f"{len(leaks)} leak(s):\n" + "\n".join(leaks[:30])
    # The scan is not blind: it does find the codes where they belong, in the messages.
    assert all(finder.find(text) for text in mails + texts if CODE_RE.search(text))


async def test_wrong_expired_and_used_codes_look_alike(leak_rig: LeakRig, user_id: str) -> None:
    cases = await oracle_cases(leak_rig, user_id, Secrets())
    for name, answers in (("Verify", cases.verify), ("Disable", cases.disable)):
        assert {k: (a.code, a.result) for k, a in answers.items()} == {
            "wrong": (grpc.StatusCode.OK, pb.VERIFY_RESULT_INVALID_CODE),
            "expired": (grpc.StatusCode.OK, pb.VERIFY_RESULT_EXPIRED),
            "used": (grpc.StatusCode.OK, pb.VERIFY_RESULT_ALREADY_USED)}, name
        assert answers["wrong"].attempts_remaining == 4
        # Only result / attempts_remaining tell the cases apart.
        assert len({a.looks_like() for a in answers.values()}) == 1, (name, answers)
        assert answers["wrong"].other_fields == ()
    for name, answers in (("Verify", cases.verify_malformed),
                          ("Disable", cases.disable_malformed)):
        # A malformed code is refused the same way whatever state the challenge is in.
        assert {a.code for a in answers.values()} == {grpc.StatusCode.INVALID_ARGUMENT}, name
        assert len({a.looks_like() for a in answers.values()}) == 1, (name, answers)
        assert [f for f, _ in answers["wrong"].field_violations] == ["code"]
    # Where the three are errors (a phone change proof), the error is one and the same.
    proofs = cases.change_proof
    assert len(proofs) == 3
    assert {(a.code, a.reason) for a in proofs.values()} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED")}
    assert len({a.looks_like() for a in proofs.values()}) == 1, proofs


# Addresses that email-validator rejects with a message quoting part of the input.
ECHOED_BY_THE_VALIDATOR = ("{user}@[IPv6:{secret}]", "{user}@{secret}\u30fb.example")


async def enroll_invalid_emails(lr: LeakRig, user_id: str) -> Finder:
    """Enrol email addresses that carry the user's TOTP secret; every one is refused."""
    s = Secrets()
    factor, _ = await enroll_app(lr, user_id, s)
    for template in ECHOED_BY_THE_VALIDATOR:
        email = template.format(user=user_id, secret=factor.secret.lower())
        with pytest.raises(aio.AioRpcError) as err:
            await lr.stub.Enroll(pb.EnrollRequest(
                user_id=user_id, method=pb.METHOD_EMAIL, email=email,
                application=pb.APPLICATION_PORTAL))
        e = rich_error(err.value)
        assert (e.code, set(e.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    {"email"})
    return s.finder()


async def test_an_invalid_email_leaks_nothing_into_logs_or_spans(
        leak_rig: LeakRig, user_id: str) -> None:
    finder = await enroll_invalid_emails(leak_rig, user_id)
    logs = [v for e in leak_rig.logs.entries if not e.logger.startswith(PROVIDER_LOGGERS)
            for v in e.values]
    spans = [sp.to_json() for sp in leak_rig.spans.get_finished_spans()]
    assert len(spans) >= 5
    assert finder.scan("logs", logs) + finder.scan("spans", spans) == []


async def test_an_invalid_email_is_not_echoed_to_the_caller(
        leak_rig: LeakRig, user_id: str) -> None:
    finder = await enroll_invalid_emails(leak_rig, user_id)
    answers = [(m, c, seen) for m, c, seen in await leak_rig.recorder.answers()
               if c == grpc.StatusCode.INVALID_ARGUMENT]
    assert len(answers) == len(ECHOED_BY_THE_VALIDATOR)
    assert [hit for m, _, seen in answers for hit in finder.scan(m, seen)] == []
