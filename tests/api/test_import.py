"""`mfa-service import`: existing factors from another system, on SQLite and PostgreSQL.

Imported factors are used through the real gRPC server (the session's ``app``, or the
delivery rig for codes that must arrive); the import runs in-process through the
command's own function (``cli_import.import_file``), and once as the real executable.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pyotp
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from mfa_service import cli_import
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.domain import Method, TotpAlgorithm, TotpParameters
from mfa_service.factors.phone_code import mask_phone
from mfa_service.factors.totp import secret_aad
from mfa_service.service.import_lines import (
    ImportLine,
    LineRefused,
    b32decode_unpadded,
    parse_line,
)
from mfa_service.service.importer import SHARDS, Importer, ImportReport
from mfa_service.store import bulk
from mfa_service.store.database import Database
from mfa_service.store.engine import create_engine
from mfa_service.store.models import audit_events, factors, user_lockouts
from tests.conftest import TEST_KEYRING, make_settings, rich_error
from tests.support.rig import Rig, code_in, eventually, phone_text, unique_email, unique_phone

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

CLI = str(Path(sys.executable).parent / "mfa-service")
OLD_DAYS = "2024-01-15T09:30:00Z"  # before every test clock's "now"


def new_secret(nbytes: int = 20) -> str:
    return base64.b32encode(os.urandom(nbytes)).decode().rstrip("=")


def otpauth(secret: str, **params: str | int) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"secret": secret, "issuer": "Legacy",
                                            **params}.items())
    return f"otpauth://totp/Legacy:jane%40example.com?{query}"


def app_line(user_id: str, secret: str, **params: str | int) -> dict[str, Any]:
    return {"user_id": user_id, "method": "authenticator_app",
            "otpauth_uri": otpauth(secret, **params), "confirmed_at": OLD_DAYS}


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def run_import(database_url: str, tmp_path: Path, lines: list[Any],
                     clock: FixedClock, *, dry_run: bool = False, batch: int = 1000,
                     workers: int = 0, **settings: object) -> Ran:
    """Write ``lines`` (dicts as JSON, strings as they are) and import the file."""
    path = tmp_path / f"import-{uuid.uuid4().hex[:8]}.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n"
                            for x in lines))
    out, err = io.StringIO(), io.StringIO()
    code = await cli_import.import_file(
        make_settings(database_url, **settings), str(path), dry_run=dry_run, batch=batch,
        workers=workers, out=out, err=err, clock=clock, keyring=Keyring.parse(TEST_KEYRING))
    return Ran(code, out.getvalue(), err.getvalue())


def summary(ran: Ran) -> dict[str, str]:
    """The summary's "name: value" lines."""
    return dict(line.split(": ", 1) for line in ran.out.splitlines()
                if ": " in line and not line.startswith("  "))


def refusals(ran: Ran) -> dict[int, str]:
    """Line number -> what the summary says of it."""
    out = {}
    for line in ran.out.splitlines():
        if line.startswith("  line "):
            number, _, rest = line[len("  line "):].partition(": ")
            out[int(number)] = rest
    return out


async def rows_of(database_url: str, table: Any, user_ids: list[str]) -> int:
    engine = create_engine(make_url(database_url))
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table).where(
                table.c.user_id.in_(user_ids)))).scalar_one())
    finally:
        await engine.dispose()


async def imported_events(database_url: str, user_id: str) -> list[dict[str, Any]]:
    engine = create_engine(make_url(database_url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(audit_events).where(
                audit_events.c.user_id == user_id,
                audit_events.c.event == "factor_imported").order_by(audit_events.c.id))).all()
    finally:
        await engine.dispose()
    return [{"caller": r.caller, "factor_id": r.factor_id, **json.loads(r.detail)}
            for r in rows]


def user() -> str:
    return f"imp-{uuid.uuid4().hex[:10]}"


# -- an imported app logs in --------------------------------------------------------------
def code_from(tool: str, secret: str, at: datetime) -> str:
    """The SHA256 / 8-digit / 60-s code of ``secret`` at ``at``, from ``tool``."""
    if tool == "pyotp":
        return pyotp.TOTP(secret, digits=8, interval=60, digest=hashlib.sha256).at(at)
    out = subprocess.run(
        [shutil.which("oathtool") or "oathtool", "--totp=sha256", "--digits=8",
         "--time-step-size=60s", "--base32",
         f"--now={at.strftime('%Y-%m-%d %H:%M:%S UTC')}", secret],
        capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("tool", ["pyotp", "oathtool"])
async def test_an_imported_sha256_eight_digit_sixty_second_app_logs_in(
        tool: str, database_url: str, stub: Stub, fresh_clock: FixedClock,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if tool == "oathtool" and shutil.which("oathtool") is None:
        pytest.skip("oathtool is not installed")
    caplog.set_level(logging.DEBUG)
    uid, secret = user(), new_secret(32)
    ran = await run_import(database_url, tmp_path, [
        app_line(uid, secret, algorithm="SHA256", digits=8, period=60)], fresh_clock)
    assert (ran.code, summary(ran)["imported"]) == (0, "1 (authenticator_app 1)"), ran.out

    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=uid))
    by_method = {f.method: f for f in listed.factors}
    app = by_method[pb.METHOD_AUTHENTICATOR_APP]
    assert app.status == pb.FACTOR_STATUS_ACTIVE
    assert app.masked_destination == "jane@example.com"  # the URI's account name
    assert app.established_at.ToDatetime().year == 2024  # established: confirmed_at
    # The recovery-code factor the service keeps beside an ACTIVE factor, with no codes.
    assert by_method[pb.METHOD_RECOVERY_CODE].status == pb.FACTOR_STATUS_ACTIVE
    assert listed.recovery_codes_remaining == 0

    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=uid, factor_id=app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    assert ch.code_length == 8
    code = code_from(tool, secret, fresh_clock.now())
    # The default length is malformed here: INVALID_ARGUMENT, no attempt used.
    with pytest.raises(aio.AioRpcError) as short:
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code[-6:]))
    assert rich_error(short.value).field_violations == {"code": "must be 8 digits"}
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))
    assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.attempts_remaining == 4
    assert ok.session.session_token

    # 30 s later (the clock was at :15) it is still the same 60-s step: a replay.
    fresh_clock.advance(30)
    again = await stub.Challenge(pb.ChallengeRequest(
        user_id=uid, factor_id=app.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    replay = await stub.Verify(pb.VerifyRequest(challenge_id=again.challenge_id, code=code))
    assert replay.result == pb.VERIFY_RESULT_INVALID_CODE

    # Established at once: it may prove new recovery codes (the proof model's strictest).
    fresh_clock.advance(60)
    proof = await stub.Challenge(pb.ChallengeRequest(
        user_id=uid, factor_id=app.factor_id, purpose=pb.PURPOSE_REGENERATE_RECOVERY_CODES,
        application=pb.APPLICATION_PORTAL))
    approved = await stub.Verify(pb.VerifyRequest(
        challenge_id=proof.challenge_id, code=code_from(tool, secret, fresh_clock.now())))
    assert approved.result == pb.VERIFY_RESULT_APPROVED
    codes = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=uid, proof_challenge_id=proof.challenge_id,
        application=pb.APPLICATION_PORTAL))
    assert len(codes.recovery_codes) == 10

    events = await imported_events(database_url, uid)
    assert events == [{"caller": "import-cli", "factor_id": app.factor_id,
                       "method": "authenticator_app", "line": 1, "run": events[0]["run"],
                       "algorithm": "sha256", "digits": 8, "period": 60,
                       "recovery_factor_id": by_method[pb.METHOD_RECOVERY_CODE].factor_id}]
    assert events[0]["run"] in ran.out  # the summary names the run its rows carry
    _no_secret_anywhere(secret, ran, caplog)


def _no_secret_anywhere(secret: str, ran: Ran, caplog: pytest.LogCaptureFixture) -> None:
    said = ran.out + ran.err + caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for form in (secret, secret.lower(), "otpauth://totp", "secret="):
        assert form not in said


async def test_an_enrolled_app_still_takes_six_digits_only(
        stub: Stub, fresh_clock: FixedClock, user_id: str) -> None:
    """The default factor is unchanged by the parameters: an 8-digit code is malformed."""
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL))
    assert resp.code_length == 6 and "digits" not in resp.otpauth_uri
    code = pyotp.TOTP(resp.totp_secret, digits=8).at(fresh_clock.now())
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id, code=code))
    assert rich_error(raised.value).field_violations == {"code": "must be 6 digits"}
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=pyotp.TOTP(resp.totp_secret).at(
                                                fresh_clock.now())))
    assert ok.result == pb.VERIFY_RESULT_APPROVED and ok.attempts_remaining == 4


# -- email and phone: codes arrive --------------------------------------------------------
async def test_imported_email_and_phone_receive_codes_and_log_in(
        rig: Rig, database_url: str, tmp_path: Path) -> None:
    uid = user()
    address, number = unique_email(uid).upper(), unique_phone()
    ran = await run_import(database_url, tmp_path, [
        {"user_id": uid, "method": "email", "email": address},
        {"user_id": uid, "method": "phone", "phone_number": number, "channel": "voice",
         "confirmed_at": OLD_DAYS, "label": "work phone"},
    ], rig.clock)
    assert ran.code == 0, ran.out
    listed = await rig.stub.ListFactors(pb.ListFactorsRequest(user_id=uid))
    by_method = {f.method: f for f in listed.factors}
    email, phone = by_method[pb.METHOD_EMAIL], by_method[pb.METHOD_PHONE]
    # email-validator lower-cases the domain (the mailbox keeps its case), as for Enroll.
    normalised = address.split("@")[0] + "@example.com"
    assert email.masked_destination == normalised[0] + "•••@example.com"
    assert phone.masked_destination.startswith("+45 ") and "•" in phone.masked_destination

    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=uid, factor_id=email.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    assert ch.code_length == 6
    mail = (await eventually(lambda: rig.mails_to(normalised)))[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                code=code_in(mail.get_content())))
    assert ok.result == pb.VERIFY_RESULT_APPROVED

    ch = await rig.stub.Challenge(pb.ChallengeRequest(
        user_id=uid, factor_id=phone.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_BACKOFFICE))
    sms = (await eventually(lambda: rig.calls_to(number)))[-1]
    ok = await rig.stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                                code=code_in(phone_text(sms))))
    assert ok.result == pb.VERIFY_RESULT_APPROVED
    # No notice of the import itself (nothing changed for the user): only the code.
    assert len(rig.mails_to(normalised, notices=True)) == len(rig.mails_to(normalised)) == 1
    assert len(rig.calls_to(number, notices=True)) == len(rig.calls_to(number)) == 1
    events = await imported_events(database_url, uid)
    assert [(e["method"], e["line"], e.get("channel")) for e in events] == [
        ("email", 1, None), ("phone", 2, "voice")]


# -- dry run, re-run ----------------------------------------------------------------------
async def test_a_dry_run_writes_nothing_and_says_what_it_would_do(
        database_url: str, fresh_clock: FixedClock, tmp_path: Path) -> None:
    a, b = user(), user()
    secret = new_secret()
    lines = [app_line(a, secret), {"user_id": a, "method": "email", "email": f"{a}@ex.org"},
             {"user_id": b, "method": "phone", "phone_number": unique_phone()},
             app_line(a, secret),  # the same app again, in a later batch: already present
             app_line(b, new_secret())]
    ran = await run_import(database_url, tmp_path, lines, fresh_clock, dry_run=True, batch=2)
    assert ran.code == 0, ran.out
    assert "(dry run: nothing was written)" in ran.out
    assert summary(ran)["would import"] == "4 (authenticator_app 2, email 1, phone 1)"
    assert summary(ran)["skipped, already present"] == "1"
    for table in (factors, audit_events, user_lockouts):
        assert await rows_of(database_url, table, [a, b]) == 0, table.name

    first = await run_import(database_url, tmp_path, lines, fresh_clock, batch=2)
    assert summary(first)["imported"] == summary(ran)["would import"]
    assert await rows_of(database_url, factors, [a, b]) == 6  # + two recovery-code factors
    assert await rows_of(database_url, audit_events, [a, b]) == 4  # one per imported factor

    again = await run_import(database_url, tmp_path, lines, fresh_clock)
    assert (again.code, summary(again)["imported"], summary(again)["skipped, already present"],
            summary(again)["refused"]) == (0, "0", "5", "0")
    assert await rows_of(database_url, factors, [a, b]) == 6
    assert await rows_of(database_url, audit_events, [a, b]) == 4


# -- bad lines -----------------------------------------------------------------------------
async def test_bad_lines_are_refused_by_number_and_the_good_ones_imported(
        database_url: str, fresh_clock: FixedClock, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good, u = user(), user()
    secret = new_secret()
    bad_uri_secret = new_secret()
    number16 = unique_phone()
    lines: list[Any] = [
        app_line(good, secret),                                               # 1
        '{"user_id": "x", "method": ',                                        # 2 bad JSON
        {"user_id": u, "method": "fax"},                                      # 3
        {"user_id": u, "method": "authenticator_app",
         "otpauth_uri": f"https://example.com/?secret={bad_uri_secret}"},    # 4 bad URI
        app_line(u, bad_uri_secret, algorithm="MD5"),                         # 5
        {"user_id": u, "method": "email", "email": "no-at-sign.example.com"},  # 6
        {"user_id": u, "method": "phone", "phone_number": "+1900555"},        # 7
        {"method": "email", "email": "someone@example.com"},                  # 8
        "",                                                                   # 9 blank
        {"user_id": good, "method": "email", "email": f"{good}@example.com"},  # 10
        app_line(u, bad_uri_secret, digits=7),                                # 11
        app_line(u, bad_uri_secret, period=15),                               # 12
        {"user_id": u, "method": "authenticator_app",
         "otpauth_uri": f"otpauth://hotp/x?secret={bad_uri_secret}&counter=1"},  # 13
        app_line(u, new_secret(5)),                                           # 14 40 bits
        {"user_id": u, "method": "email", "email": "a@example.com",
         "secret": bad_uri_secret},                                           # 15
        {"user_id": u, "method": "phone", "phone_number": number16,
         "channel": "fax"},                                                   # 16
        {"user_id": u, "method": "email", "email": "b@example.com",
         "confirmed_at": "yesterday"},                                        # 17
        {"user_id": u, "method": "email", "email": "c@example.com",
         "confirmed_at": "2999-01-01T00:00:00Z"},                             # 18
        "[1, 2, 3]",                                                          # 19
        {"user_id": good, "method": "phone", "phone_number": unique_phone()},  # 20
        {"user_id": " padded", "method": "email", "email": "d@example.com"},  # 21
    ]
    ran = await run_import(database_url, tmp_path, lines, fresh_clock, batch=4)
    assert ran.code == 1
    assert summary(ran)["imported"] == "3 (authenticator_app 1, email 1, phone 1)"
    assert summary(ran)["lines read"] == "20"  # the blank line is not one
    said = refusals(ran)
    # The number of a line refused for another field is shown, masked.
    assert said.pop(16) == f"user {u}, {mask_phone(number16)}: channel must be sms or voice"
    assert said.pop(2).startswith("not valid JSON (Expecting value at column ")
    assert said == {
        3: f"user {u}: method must be one of authenticator_app, email, phone",
        4: f"user {u}: otpauth_uri is not an otpauth:// URI",
        5: f"user {u}: otpauth_uri algorithm MD5 is not supported (SHA1, SHA256 or SHA512)",
        6: f"user {u}: email is not a valid email address",
        7: f"user {u}: phone_number is not a valid phone number",
        8: "user_id is required",
        11: f"user {u}: otpauth_uri digits 7 is not supported (6 or 8)",
        12: f"user {u}: otpauth_uri period 15 is not supported (30 or 60)",
        13: f"user {u}: otpauth_uri is an HOTP (counter-based) app: only TOTP apps are "
            "supported",
        14: f"user {u}: otpauth_uri has a secret shorter than 80 bits",
        15: f"user {u}: unknown field for email: secret",
        17: f"user {u}: confirmed_at is not an RFC 3339 date-time",
        18: f"user {u}: confirmed_at is in the future",
        19: "not a JSON object",
        21: "user_id must be 1-128 printable characters without outer spaces",
    }
    assert await rows_of(database_url, factors, [u]) == 0
    assert await rows_of(database_url, factors, [good]) == 4  # 3 + recovery codes
    # The bad URIs' secrets never reach the output or a log.
    _no_secret_anywhere(bad_uri_secret, ran, caplog)
    _no_secret_anywhere(secret, ran, caplog)


async def test_the_services_rules_skip_or_refuse_conflicting_lines(
        database_url: str, stub: Stub, fresh_clock: FixedClock, tmp_path: Path) -> None:
    """One ACTIVE factor per method, the per-user cap, and "already present"."""
    enrolled = user()
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=enrolled, method=pb.METHOD_AUTHENTICATOR_APP,
        application=pb.APPLICATION_PORTAL))
    await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                       code=pyotp.TOTP(resp.totp_secret).at(fresh_clock.now())))
    capped, address = user(), "Case@Example.com"
    lines: list[Any] = [
        # The app enrolled through the API is the same factor (same secret, SHA1/6/30).
        {"user_id": enrolled, "method": "authenticator_app",
         "otpauth_uri": f"otpauth://totp/x?secret={resp.totp_secret.lower()}"},
        app_line(enrolled, new_secret()),  # another secret: refused
        app_line(enrolled, resp.totp_secret, digits=8),  # other parameters: refused
        {"user_id": capped, "method": "email", "email": address},
        {"user_id": capped, "method": "email", "email": "case@example.com"},  # same mailbox
        {"user_id": capped, "method": "email", "email": "other@example.com"},
        {"user_id": capped, "method": "phone", "phone_number": unique_phone()},  # the cap
    ]
    ran = await run_import(database_url, tmp_path, lines, fresh_clock,
                           max_factors_per_user=2)
    assert summary(ran)["imported"] == "1 (email 1)"
    assert summary(ran)["skipped, already present"] == "2"
    said = refusals(ran)
    assert said[2] == (f"user {enrolled}: the user already has an active authenticator_app "
                       "factor with another secret or TOTP parameters (disable it first)")
    assert said[3] == said[2]
    assert said[6] == (f"user {capped}, o•••@example.com: the user already has an active "
                       "email factor with another address (disable it first)")
    assert said[7].startswith(f"user {capped}, +45 ")
    assert said[7].endswith(": the user has 2 factors, the most MFA_MAX_FACTORS_PER_USER (2) "
                            "allows")  # the email and its recovery-code factor
    assert set(said) == {2, 3, 6, 7}


# -- the bulk path -------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
async def test_hundreds_of_lines_in_batches_with_a_row_the_database_refuses(
        workers: int, database_url: str, fresh_clock: FixedClock, tmp_path: Path) -> None:
    """Several batches; one of them holds a row the database itself refuses (a trigger
    here), so that batch is written again line by line and only that line is refused;
    every other factor, in the same batch too, is imported with its audit row."""
    if workers and not database_url.startswith("postgresql"):
        pytest.skip("the parsing processes are the same on both databases")
    prefix = f"bulk-{uuid.uuid4().hex[:6]}-"
    users = [f"{prefix}{i}" for i in range(150)]
    lines: list[Any] = []
    secrets: dict[str, str] = {}
    for i, uid in enumerate(users):
        secrets[uid] = new_secret(20 if i % 2 else 10)
        extra: dict[str, str | int] = {"algorithm": "SHA512", "digits": 8} if i % 3 == 0 else {}
        lines.append(app_line(uid, secrets[uid], **extra))
        if i % 2 == 0:
            lines.append({"user_id": uid, "method": "email", "email": f"{uid}@example.com"})
    refused_user = users[77]
    async with RefusingTrigger(database_url, refused_user):
        ran = await run_import(database_url, tmp_path, lines, fresh_clock, batch=64,
                               workers=workers)
    assert ran.code == 1
    assert list(refusals(ran)) == [next(i + 1 for i, x in enumerate(lines)
                                        if x["user_id"] == refused_user)]
    assert "the database refused it" in ran.out
    assert summary(ran)["imported"] == "224 (authenticator_app 149, email 75)"
    assert await rows_of(database_url, factors, users) == 224 + 149
    assert await rows_of(database_url, audit_events, users) == 224

    # Every secret is stored exactly as Enroll stores one (AES-GCM bound to its row).
    keyring = Keyring.parse(TEST_KEYRING)
    engine = create_engine(make_url(database_url))
    try:
        async with engine.connect() as conn:
            stored = (await conn.execute(select(factors).where(
                factors.c.user_id.in_(users), factors.c.method == "authenticator_app"))).all()
    finally:
        await engine.dispose()
    for row in stored:
        plain = keyring.decrypt(row.secret_key_id, row.secret_ciphertext,
                                secret_aad(row.id, row.user_id))
        assert base64.b32encode(plain).decode().rstrip("=") == secrets[row.user_id]
        index = users.index(row.user_id)
        assert (row.totp_algorithm, row.totp_digits, row.totp_period) == (
            ("sha512", 8, 30) if index % 3 == 0 else (None, None, None))


class RefusingTrigger:
    """A trigger that makes the database refuse factor rows of one user, as a constraint
    would (SQLSTATE 23514 on PostgreSQL, a constraint error on SQLite)."""

    def __init__(self, database_url: str, user_id: str) -> None:
        self._url, self._user = database_url, user_id.replace("'", "''")
        self._pg = database_url.startswith("postgresql")

    async def _run(self, *statements: str) -> None:
        engine = create_engine(make_url(self._url))
        try:
            async with engine.begin() as conn:
                for statement in statements:
                    await conn.execute(text(statement))
        finally:
            await engine.dispose()

    async def __aenter__(self) -> None:
        if self._pg:
            await self._run(
                "CREATE FUNCTION refuse_import_row() RETURNS trigger LANGUAGE plpgsql AS $$"
                f" BEGIN IF NEW.user_id = '{self._user}' THEN RAISE EXCEPTION 'refused'"
                " USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$",
                "CREATE TRIGGER refuse_import_row BEFORE INSERT ON factors FOR EACH ROW"
                " EXECUTE FUNCTION refuse_import_row()")
        else:
            await self._run(
                "CREATE TRIGGER refuse_import_row BEFORE INSERT ON factors"
                f" WHEN NEW.user_id = '{self._user}' BEGIN SELECT RAISE(ABORT, 'refused'); END")

    async def __aexit__(self, *exc: object) -> None:
        if self._pg:
            await self._run("DROP TRIGGER refuse_import_row ON factors",
                            "DROP FUNCTION refuse_import_row()")
        else:
            await self._run("DROP TRIGGER refuse_import_row")


def test_copy_writes_every_column_that_has_no_default() -> None:
    """A column added to factors or audit_events later is either written by the importer's
    COPY or may be left out (nullable, or a server default)."""
    for table, written in ((factors, bulk.FACTOR_COLUMNS), (audit_events, bulk.AUDIT_COLUMNS)):
        left_out = [c for c in table.c if c.name not in written]
        assert all(c.nullable or c.server_default is not None or c.autoincrement is True
                   for c in left_out), [c.name for c in left_out]
        assert set(written) <= {c.name for c in table.c}


# -- the real executable, from standard input ---------------------------------------------
async def test_the_command_reads_standard_input_and_keeps_secrets_out_of_its_output(
        tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mfa.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFA_")}
    env.update(MFA_DATABASE_URL=url, MFA_KEYRING=TEST_KEYRING, MFA_LOG_FORMAT="json",
               MFA_LOG_LEVEL="DEBUG")
    secret = new_secret()
    data = "\n".join([json.dumps(app_line("cli-user", secret, algorithm="SHA256")),
                      json.dumps({"user_id": "cli-user", "method": "authenticator_app",
                                  "otpauth_uri": otpauth(secret, digits=9)})]) + "\n"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, "import", *args, "-"], input=data, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    first = await asyncio.to_thread(run)  # parsed in a worker process (the default here)
    assert first.returncode == 1, first.stderr
    assert "imported: 1 (authenticator_app 1)" in first.stdout
    assert "  line 2: user cli-user: otpauth_uri digits 9 is not supported (6 or 8)" \
        in first.stdout
    rerun = await asyncio.to_thread(run, "--workers", "0")
    assert "imported: 0\nskipped, already present: 1\nrefused: 1" in rerun.stdout
    for result in (first, rerun):
        for form in (secret, secret.lower(), "otpauth://totp", "secret="):
            assert form not in result.stdout + result.stderr
    assert '"msg": "import finished"' in first.stderr  # the one log line, with counts


# -- the pure parts ------------------------------------------------------------------------
def test_a_line_reads_the_uri_the_way_apps_write_it() -> None:
    secret = base64.b32encode(b"12345678901234567890").decode()  # padded, upper case
    now = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    raw = json.dumps({"user_id": "u", "method": "authenticator_app", "label": "My phone",
                      "confirmed_at": "2025-06-01T10:00:00+02:00",
                      "otpauth_uri": f"OTPAUTH://TOTP/Acme%3A%20bob?SECRET={secret.lower()}"
                                     "&Algorithm=sha512&period=60"}).encode()
    line = parse_line(7, raw, now)
    assert isinstance(line, ImportLine)
    assert (line.line, line.user_id, line.method, line.label, line.masked) == (
        7, "u", Method.AUTHENTICATOR_APP, "My phone", "My phone")
    assert line.secret == b"12345678901234567890"
    assert line.totp == TotpParameters(TotpAlgorithm.SHA512, 6, 60)
    assert line.confirmed_at is not None and line.confirmed_at.utcoffset() is not None
    assert "secret" not in repr(line) and "1234567890" not in repr(line)

    for uri, reason in [
        (f"otpauth://totp/x?secret={secret}&secret={secret}", "names secret twice"),
        ("otpauth://totp/x?issuer=A", "has no secret"),
        ("otpauth://totp/x?secret=abc1!", "has a secret that is not base32"),
        (f"otpauth://totp/x?secret={secret}&algorithm={'X' * 40}",
         "algorithm is not supported (SHA1, SHA256 or SHA512)"),
        (f"otpauth://totp/x?secret={secret}&&digits=6", "has a malformed query"),
    ]:
        refused = parse_line(1, json.dumps({"user_id": "u", "method": "authenticator_app",
                                            "otpauth_uri": uri}).encode(), now)
        assert refused == LineRefused(1, f"otpauth_uri {reason}", "u"), uri
    assert parse_line(3, b"   \n", now) is None
    assert parse_line(4, b"\xff\xfe", now) == LineRefused(4, "not UTF-8")


def test_base32_decodes_as_the_standard_library_does() -> None:
    for size in range(1, 130):
        data = os.urandom(size)
        assert b32decode_unpadded(base64.b32encode(data).decode().rstrip("=")) == data
    # A length no whole number of bytes ends on (1, 3 or 6 characters past a group).
    now = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    for digits in ("A" * 17, "A" * 19, "A" * 22):
        refused = parse_line(1, json.dumps({
            "user_id": "u", "method": "authenticator_app",
            "otpauth_uri": f"otpauth://totp/x?secret={digits}"}).encode(), now)
        assert refused == LineRefused(1, "otpauth_uri has a secret that is not base32", "u")


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    ticks = iter(range(100))
    report = ImportReport(run_id="r", dry_run=False, lines=500, skipped=20, bytes_read=250)
    report.imported[Method.EMAIL] = 480

    terminal = _Terminal(tty=True)
    bar = cli_import.Progress(terminal, 1000, monotonic=lambda: float(next(ticks)))
    bar.update(report)
    bar.finish(report)
    drawn = terminal.getvalue()
    assert drawn.startswith("\r[#######.......................]  25%  500 lines, 480 imported")
    assert drawn.endswith("\n") and drawn.count("\r") == 2

    log = _Terminal(tty=False)
    lines = cli_import.Progress(log, 1000, interval=5, monotonic=lambda: float(next(ticks)))
    for _ in range(12):  # a tick a second: a line every 5
        lines.update(report)
    lines.finish(report)
    written = log.getvalue().splitlines()
    assert len(written) == 2 and "\r" not in log.getvalue()
    assert written[0].startswith("import: 500 lines, 480 imported, 20 skipped, 0 refused,")
    assert written[0].endswith("(25% of the file)")


async def test_the_database_going_away_stops_the_run_and_says_where(
        empty_postgres: str, fresh_clock: FixedClock) -> None:
    """A batch the database cannot take (it was dropped after the first): the run stops
    at once and says where; what was committed stays, so a run again goes on from there."""
    from tests.conftest import PG_ADMIN_URL, _asyncpg_dsn, _migrate

    await _migrate(empty_postgres)
    name = make_url(empty_postgres).database

    def drop_the_database() -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=5)
            try:
                await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        worker = threading.Thread(target=asyncio.run, args=(drop(),))
        worker.start()
        worker.join()

    written: list[int] = []

    def progress(report: ImportReport) -> None:
        written.append(report.imported_total)
        if len(written) == 1:
            drop_the_database()  # between the first batch and the second

    database = Database(create_engine(make_url(empty_postgres)))
    importer = Importer(database, Keyring.parse(TEST_KEYRING), fresh_clock, max_factors=20,
                        batch=2)
    # Batches of two, each written as SHARDS transactions at once; users chosen so each
    # batch uses both, so the second batch finds the two connections the first made,
    # both cut off by the drop (no new connection is tried against a missing database).
    users = [f"gone-{uuid.uuid4().hex[:8]}" for _ in range(200)]
    by_shard = [[u for u in users if zlib.crc32(u.encode()) % SHARDS == s]
                for s in range(SHARDS)]
    lines = [app_line(by_shard[i % SHARDS][i], new_secret()) for i in range(5)]
    source = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    try:
        report = await importer.run(source, progress)
    finally:
        await database.dispose()
    assert written == [2]
    assert report.imported_total == 2 and report.lines == 2
    assert report.stopped == ("the database is unavailable, retry later: stopped at line 3; "
                              "what was imported before stays, and a run again skips it")
    assert cli_import.format_report(report)[-1] == f"stopped: {report.stopped}"
