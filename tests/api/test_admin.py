"""Operator commands: key rotation and status, the support desk's reset, the audit trail.

Rotation and key status look at every row of the database, so those tests get a database
of their own (other tests' rows are under TEST_KEYRING); the rest use the shared one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
from grpc import aio
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import make_url

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock, SystemClock
from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import decode_payload
from mfa_service.factors.totp import secret_aad
from mfa_service.service import admin as admin_module
from mfa_service.service.admin import AdminService
from mfa_service.service.notices import Notifier, nothing_else
from mfa_service.store import maintenance
from mfa_service.store.maintenance import StoredCiphertext
from mfa_service.store.models import (
    audit_events,
    challenges,
    factors,
    outbox,
    recovery_codes,
    user_lockouts,
)
from mfa_service.store.outbox import SENT, OutboxRepository
from mfa_service.store.repositories import FactorRepository
from mfa_service.store.unit import Unit
from tests.support.admin import GONE, NEW, OLD, ROTATED, add_factor, add_message, factor_row, opened
from tests.support.client import enroll_app, login, totp_at
from tests.support.config import (
    PG_ADMIN_URL,
    T0,
    TEST_KEYRING,
    asyncpg_dsn,
    make_settings,
    migrate_to_head,
)
from tests.support.rig import Rig, delivered_all, enroll_email, enroll_phone, eventually, phone_text

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
async def own_url(database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database for this test, on the backend ``database_url`` is on."""
    if make_url(database_url).get_backend_name() == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
        await migrate_to_head(url)
        yield url
        return
    name = f"mfa_admin_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    await migrate_to_head(url)
    try:
        yield url
    finally:
        conn = await asyncpg.connect(asyncpg_dsn(PG_ADMIN_URL), timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@asynccontextmanager
async def serving(url: str, clock: FixedClock, keyring: str) -> AsyncIterator[Stub]:
    app = await create_server(make_settings(url), clock=clock, keyring=Keyring.parse(keyring))
    try:
        async with aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield pb_grpc.TwoFactorServiceStub(channel)
    finally:
        await app.stop(0)


def usage(status: admin_module.KeyStatus, key_id: str) -> admin_module.KeyUsage:
    [found] = [k for k in status.keys if k.key_id == key_id]
    return found


def b32(secret: str) -> bytes:
    return base64.b32decode(secret + "=" * (-len(secret) % 8))


# -- keys rotate / keys status -----------------------------------------------------------------
async def test_rotation_moves_passkey_credentials_and_open_ceremonies_still_pass(
        own_url: str) -> None:
    """A passkey's credential is bound with its own AAD: the rotation must re-encrypt it
    with that one, and a challenge opened before the rotation (its WebAuthn challenge
    derived under the old key) still verifies after it."""
    from tests.support.softauthn import SoftAuthenticator
    clock = FixedClock(T0)
    key = SoftAuthenticator()
    async with serving(own_url, clock, OLD) as stub:
        enrolled = await stub.Enroll(pb.EnrollRequest(
            user_id="dora", method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL))
        assert (await stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id,
            webauthn_response=key.create(enrolled.webauthn_creation_options)))).result == (
            pb.VERIFY_RESULT_APPROVED)
        before = await stub.Challenge(pb.ChallengeRequest(
            user_id="dora", factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
    async with opened(own_url) as db:
        report = await AdminService(db, clock).rotate_keys(Keyring.parse(ROTATED))
        assert report.ok, report.failures
        assert report.factor_secrets.rekeyed == 1
        assert (await factor_row(db, enrolled.factor.factor_id)).secret_key_id == "new-1"
    async with serving(own_url, clock, ROTATED) as stub:
        ok = await stub.Verify(pb.VerifyRequest(
            challenge_id=before.challenge_id,
            webauthn_response=key.get(before.webauthn_request_options)))
        assert ok.result == pb.VERIFY_RESULT_APPROVED


async def test_rotation_moves_secrets_to_the_primary_key_while_old_hmacs_keep_working(
        own_url: str) -> None:
    clock = FixedClock(T0)
    async with serving(own_url, clock, OLD) as stub:
        active = await enroll_app(stub, "alice", clock)
        session = await login(stub, active, clock)
        pending = await stub.Enroll(pb.EnrollRequest(
            user_id="bob", method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL))
        emailed = await stub.Enroll(pb.EnrollRequest(
            user_id="carol", method=pb.METHOD_EMAIL, email="carol@example.com",
            application=pb.APPLICATION_PORTAL))
    old, rotated = Keyring.parse(OLD), Keyring.parse(ROTATED)
    async with opened(own_url) as db:
        async with db.engine.connect() as conn:
            message = (await conn.execute(select(outbox).where(
                outbox.c.challenge_id == emailed.challenge_id))).one()
        body = decode_payload(old, message.id, message.payload_key_id,
                              message.payload_ciphertext)
        admin = AdminService(db, clock)

        before = await admin.key_status(rotated)
        assert usage(before, "old-1").counts[maintenance.FACTOR_SECRETS] == 2
        assert usage(before, "old-1").counts[maintenance.OUTBOX_PAYLOADS] == 1
        assert usage(before, "new-1").total == 0

        report = await admin.rotate_keys(rotated, batch=1)  # batch 1: every page boundary
        assert report.ok, report.failures
        assert (report.factor_secrets.rekeyed, report.factor_secrets.skipped) == (2, 0)
        assert (report.outbox_payloads.rekeyed, report.outbox_payloads.skipped) == (1, 0)

        for factor_id, user_id, secret in ((active.factor_id, "alice", active.secret),
                                           (pending.factor.factor_id, "bob",
                                            pending.totp_secret)):
            row = await factor_row(db, factor_id)
            assert row.secret_key_id == "new-1"
            assert rotated.decrypt("new-1", row.secret_ciphertext,
                                   secret_aad(factor_id, user_id)) == b32(secret)
        async with db.engine.connect() as conn:
            message = (await conn.execute(select(outbox).where(
                outbox.c.id == message.id))).one()
            snapshot = sorted((await conn.execute(
                select(factors.c.id, factors.c.secret_ciphertext))).all())
        assert message.payload_key_id == "new-1"
        assert decode_payload(rotated, message.id, "new-1", message.payload_ciphertext) == body

        after = await admin.key_status(rotated)
        still = usage(after, "old-1")
        assert still.encrypted == 0
        assert still.counts[maintenance.LIVE_SESSIONS] == 1  # alice's session: an HMAC
        assert still.counts[maintenance.OPEN_CHALLENGES] == 1  # carol's emailed code
        assert [k.key_id for k in after.still_needed] == ["old-1"]
        assert after.removable == [] and after.unknown == [] and after.ok

        again = await admin.rotate_keys(rotated)
        assert (again.factor_secrets.examined, again.outbox_payloads.examined) == (0, 0)
        async with db.engine.connect() as conn:
            assert sorted((await conn.execute(
                select(factors.c.id, factors.c.secret_ciphertext))).all()) == snapshot
            audited = (await conn.execute(select(audit_events).where(
                audit_events.c.event == "keys_rotated"))).all()
        assert len(audited) == 1  # the no-op second run wrote nothing
        assert json.loads(audited[0].detail)["factor_secrets_rekeyed"] == 2
        assert audited[0].caller == "admin-cli"

        # Dropping old-1 now would strand the HMAC-keyed values: reported as a problem.
        dropped = await admin.key_status(Keyring.parse(NEW))
        assert [k.key_id for k in dropped.unknown] == ["old-1"] and not dropped.ok

    # A server on the rotated keyring reads the re-encrypted secret and the old session.
    async with serving(own_url, clock, ROTATED) as stub:
        challenge = await stub.Challenge(pb.ChallengeRequest(
            user_id="alice", factor_id=active.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        result = await stub.Verify(pb.VerifyRequest(
            challenge_id=challenge.challenge_id, code=totp_at(active.secret, clock)))
        assert result.result == pb.VERIFY_RESULT_APPROVED
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=session.session_token, application=pb.APPLICATION_PORTAL))
        assert check.valid and check.user_id == "alice"


async def test_a_factor_disabled_during_rotation_is_skipped_not_resurrected(
        own_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(T0)
    async with opened(own_url) as db:
        factor_id = await add_factor(db, Keyring.parse(OLD), "dave", clock.now())
        listed = maintenance.factor_secrets_to_rekey

        async def list_then_disable(unit: Unit, primary_id: str, *,
                                    after: str | None, limit: int) -> list[StoredCiphertext]:
            rows = await listed(unit, primary_id, after=after, limit=limit)
            if rows:  # the factor is disabled (and wiped) right after the listing read it
                assert await FactorRepository(unit).disable(factor_id, clock.now())
            return rows

        monkeypatch.setattr(maintenance, "factor_secrets_to_rekey", list_then_disable)
        report = await AdminService(db, clock).rotate_keys(Keyring.parse(ROTATED))

        assert (report.factor_secrets.rekeyed, report.factor_secrets.skipped) == (0, 1)
        assert report.ok
        row = await factor_row(db, factor_id)
        assert row.status == "disabled"
        assert (row.secret_ciphertext, row.secret_key_id) == (None, None)


async def test_a_message_sent_during_rotation_keeps_its_wiped_body(
        own_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FixedClock(T0)
    async with opened(own_url) as db:
        message_id = await add_message(db, Keyring.parse(OLD), "erin", clock.now())
        listed = maintenance.outbox_payloads_to_rekey

        async def list_then_send(unit: Unit, primary_id: str, *,
                                 after: str | None, limit: int) -> list[StoredCiphertext]:
            rows = await listed(unit, primary_id, after=after, limit=limit)
            if rows:  # a dispatcher sends it right after the listing: settle wipes the body
                messages = OutboxRepository(unit)
                [claimed] = await messages.claim_due(clock.now(), timedelta(minutes=1), 5)
                assert await messages.settle(claimed.message_id, claimed.claim_token, SENT,
                                             clock.now())
            return rows

        monkeypatch.setattr(maintenance, "outbox_payloads_to_rekey", list_then_send)
        report = await AdminService(db, clock).rotate_keys(Keyring.parse(ROTATED))

        assert (report.outbox_payloads.rekeyed, report.outbox_payloads.skipped) == (0, 1)
        async with db.engine.connect() as conn:
            row = (await conn.execute(select(outbox).where(outbox.c.id == message_id))).one()
        assert row.state == SENT
        assert row.payload_ciphertext is None


async def test_values_under_a_key_missing_from_the_keyring_are_reported(own_url: str) -> None:
    clock = FixedClock(T0)
    async with opened(own_url) as db:
        factor_id = await add_factor(db, Keyring.parse(GONE), "frank", clock.now())
        kept = await add_factor(db, Keyring.parse(OLD), "grace", clock.now())
        admin = AdminService(db, clock)

        report = await admin.rotate_keys(Keyring.parse(ROTATED))

        assert (report.factor_secrets.rekeyed, report.factor_secrets.failed) == (1, 1)
        assert not report.ok
        assert report.failures == [
            f"factors {factor_id} (key gone-1): unknown key id 'gone-1'"]
        assert (await factor_row(db, factor_id)).secret_key_id == "gone-1"  # left alone
        assert (await factor_row(db, kept)).secret_key_id == "new-1"
        status = await admin.key_status(Keyring.parse(ROTATED))
        assert [k.key_id for k in status.unknown] == ["gone-1"] and not status.ok
        assert [k.key_id for k in status.removable] == ["old-1"]


# -- admin reset-user ----------------------------------------------------------------------------
async def test_reset_user_takes_away_every_factor_session_code_and_lockout(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    open_challenge = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    enabled = [f for f in (await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))).factors
               if f.status != pb.FACTOR_STATUS_DISABLED]
    now = fresh_clock.now()
    async with app.database.transaction() as tx:
        await tx.execute(delete(user_lockouts).where(user_lockouts.c.user_id == user_id))
        await tx.execute(insert(user_lockouts).values(
            user_id=user_id, consecutive_failures=100, last_failure_at=now,
            admin_reset_required=True))
        await tx.execute(insert(recovery_codes).values(
            id=str(uuid.uuid4()), user_id=user_id, code_hash=os.urandom(32), key_id="test-1",
            created_at=now))
    admin = AdminService(app.database, fresh_clock)

    report = await admin.reset_user(user_id, "SD-1234: lost phone, identity checked")

    assert report.lockout_cleared and not report.nothing_done
    assert (report.factors_disabled, report.sessions_revoked) == (len(enabled), 1)
    assert report.recovery_codes_retired >= 1 and report.challenges_closed >= 1
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert {f.status for f in listed.factors} == {pb.FACTOR_STATUS_DISABLED}
    row = await factor_row(app.database, factor.factor_id)
    assert (row.secret_ciphertext, row.secret_key_id) == (None, None)
    check = await stub.CheckSession(pb.CheckSessionRequest(
        session_token=session.session_token, application=pb.APPLICATION_PORTAL))
    assert not check.valid
    async with app.database.engine.connect() as conn:
        # The counter is cleared in place (the row stays: its lock_version only grows).
        counter = (await conn.execute(select(user_lockouts).where(
            user_lockouts.c.user_id == user_id))).one()
        assert (counter.consecutive_failures, counter.last_failure_at, counter.locked_until,
                counter.admin_reset_required) == (0, None, None, False)
        assert counter.lock_version >= 1
        assert await conn.scalar(select(func.count()).select_from(recovery_codes).where(
            recovery_codes.c.user_id == user_id, recovery_codes.c.used_at.is_(None))) == 0
        assert await conn.scalar(select(challenges.c.state).where(
            challenges.c.id == open_challenge.challenge_id)) == "superseded"
        raw_detail = await conn.scalar(select(audit_events.c.detail).where(
            audit_events.c.user_id == user_id, audit_events.c.event == "admin_reset"))
    assert isinstance(raw_detail, str)
    assert factor.secret not in raw_detail and session.session_token not in raw_detail

    async with app.database.transaction() as tx:
        [event, *_] = await tx.audit.page(user_id)
    assert (event.event, event.outcome, event.caller) == ("admin_reset", "ok", "admin-cli")
    assert event.detail["reason"] == "SD-1234: lost phone, identity checked"
    assert event.detail["factors_disabled"] == len(enabled)
    assert event.detail["sessions_revoked"] == 1

    again = await admin.reset_user(user_id, "double check")
    assert again.nothing_done
    async with app.database.transaction() as tx:
        [latest, *_] = await tx.audit.page(user_id)
    assert (latest.event, latest.outcome) == ("admin_reset", "nothing_to_reset")


@pytest.mark.parametrize(("user", "reason", "field"), [
    ("u", "", "reason"), ("u", "   ", "reason"), ("u", "x" * 501, "reason"),
    ("u", "two\nlines", "reason"), ("", "ok", "user_id"), (" u", "ok", "user_id"),
    ("u" * 129, "ok", "user_id"),
])
async def test_reset_user_refuses_bad_input(app: App, user: str, reason: str,
                                            field: str) -> None:
    from mfa_service.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as raised:
        await AdminService(app.database, SystemClock()).reset_user(user, reason)
    assert [v.field for v in raised.value.violations] == [field]


# -- the real executable ----------------------------------------------------------------------


async def test_a_reset_user_hears_of_it_on_every_address_and_number(rig: Rig) -> None:
    """NIST SP 800-63B-4: the subscriber is told of an account recovery, so a reset they
    did not ask for (a support desk talked round) is noticed. By real mail and SMS."""
    user = f"reset-{uuid.uuid4().hex[:8]}"
    _, address = await enroll_email(rig, user)
    _, number = await enroll_phone(rig, user)
    # Every notice so far has arrived (the phone's "added" notice also went by mail).
    await delivered_all(rig, user)
    mails = len(rig.mails_to(address, notices=True))
    texts = len(rig.calls_to(number, notices=True))
    keyring = Keyring.parse(TEST_KEYRING)
    admin = AdminService(rig.app.database, rig.clock,
                         Notifier(keyring, "Cloud Platform", timedelta(hours=1),
                                  on_factor_change=nothing_else))

    report = await admin.reset_user(user, "SD-99: lost everything, identity checked")

    assert report.factors_disabled == 3  # email, phone, recovery codes
    mail = (await eventually(lambda: rig.mails_to(address, notices=True)[mails:]))[-1]
    assert "two-factor methods were reset" in mail["Subject"]
    assert "Support turned off every two-factor method" in mail.get_content()
    sms = phone_text((await eventually(
        lambda: rig.calls_to(number, notices=True)[texts:]))[-1])
    assert "Support turned off every two-factor method" in sms
    async with rig.app.database.transaction() as tx:
        [event, *_] = await tx.audit.page(user)
    assert event.event == "admin_reset" and event.detail["notices"] == 2


async def test_ending_every_session_reaches_the_servers_caches(
        app: App, stub: Stub, fresh_clock: FixedClock) -> None:
    """ASVS V7.4.5: an operator ends every user's sessions at once (a suspected leak of
    session tokens); a session a server had cached is refused too."""
    tokens = []
    for n in range(2):
        factor = await enroll_app(stub, f"every-{n}-{uuid.uuid4().hex[:8]}", fresh_clock)
        tokens.append((await login(stub, factor, fresh_clock)).session_token)

    async def valid(token: str) -> bool:
        return (await stub.CheckSession(pb.CheckSessionRequest(
            session_token=token, application=pb.APPLICATION_PORTAL))).valid
    assert all([await valid(t) for t in tokens])  # and now in the cache on PostgreSQL

    ended, _ = await AdminService(app.database, fresh_clock).end_all_sessions(
        "INC-7: session tokens may have leaked")

    assert ended >= 2
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2  # NOTIFY reaches the listener well within a second
    while any([await valid(t) for t in tokens]):
        assert loop.time() < deadline, "a cached session outlived end-all-sessions"
        await asyncio.sleep(0.02)
    async with app.database.engine.connect() as conn:
        detail = await conn.scalar(select(audit_events.c.detail).where(
            audit_events.c.event == "all_sessions_ended").order_by(audit_events.c.id.desc()))
    assert isinstance(detail, str) and "INC-7" in detail
