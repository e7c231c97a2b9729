"""Security rules through the generated client: lockout, recovery codes, caller
authentication (bearer tokens and mTLS with real certificates), the audit trail, and the
production start-up refusals. On SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mfa.v1 import two_factor_service_pb2 as pb
from mfa.v1 import two_factor_service_pb2_grpc as pb_grpc
from sqlalchemy import select

from mfa_service.app import App, create_server
from mfa_service.clock import FixedClock
from mfa_service.crypto import Keyring
from mfa_service.errors import ConfigurationError
from mfa_service.store.models import recovery_codes
from mfa_service.transport.auth import new_token
from tests.support.certs import Authority, write
from tests.support.client import AppFactor, enroll_app, login, regenerate_proof, rich_error, totp_at
from tests.support.config import TEST_KEYRING, make_settings

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub


# -- the lockout policy (pure) -------------------------------------------------------------


# -- lockout through the API ----------------------------------------------------------------
def wrong_code(factor: AppFactor, clock: FixedClock) -> str:
    return f"{(int(totp_at(factor.secret, clock)) + 500_000) % 1_000_000:06d}"


async def open_login(stub: Stub, factor: AppFactor) -> str:
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=factor.user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    return ch.challenge_id


async def guess_wrong(stub: Stub, factor: AppFactor, clock: FixedClock, times: int) -> None:
    challenge_id = await open_login(stub, factor)
    for _ in range(times):
        await stub.Verify(pb.VerifyRequest(challenge_id=challenge_id,
                                           code=wrong_code(factor, clock)))


async def test_five_failures_lock_the_user_then_the_wait_doubles(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    await guess_wrong(stub, factor, fresh_clock, 5)
    # Locked for every factor and every call that would send or check a code.
    with pytest.raises(aio.AioRpcError) as err:
        await open_login(stub, factor)
    e = rich_error(err.value)
    assert (e.code, e.reason, e.retry_seconds) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "ERROR_REASON_USER_LOCKED_OUT", 60)

    fresh_clock.advance(60)
    await guess_wrong(stub, factor, fresh_clock, 5)
    with pytest.raises(aio.AioRpcError) as err:
        await open_login(stub, factor)
    assert rich_error(err.value).retry_seconds == 120

    fresh_clock.advance(120)
    await login(stub, factor, fresh_clock)  # a success resets the count...
    await guess_wrong(stub, factor, fresh_clock, 4)
    assert await open_login(stub, factor)  # ...so four new failures do not lock

    events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id,
                                                                  page_size=500))
    lockouts = [ev for ev in events.events if ev.event == "lockout"]
    assert [ev.detail["failures"] for ev in lockouts] == ["10", "5"]  # newest first


async def test_one_hundred_failures_need_an_administrator_reset(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    for _ in range(20):
        await guess_wrong(stub, factor, fresh_clock, 5)
        fresh_clock.advance(15 * 60)
    fresh_clock.advance(timedelta(days=2))  # time does not help any more
    with pytest.raises(aio.AioRpcError) as err:
        await open_login(stub, factor)
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_ADMIN_RESET_REQUIRED")


# -- recovery codes ---------------------------------------------------------------------------
async def enroll_with_codes(stub: Stub, user_id: str,
                            clock: FixedClock) -> tuple[AppFactor, list[str], str]:
    """An active app factor, its recovery codes and the recovery factor's id."""
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP, application=pb.APPLICATION_PORTAL))
    ok = await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                            code=totp_at(resp.totp_secret, clock)))
    clock.advance(30)
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    recovery = [f for f in listed.factors if f.method == pb.METHOD_RECOVERY_CODE]
    assert len(recovery) == 1
    return (AppFactor(resp.factor.factor_id, resp.totp_secret, user_id),
            list(ok.recovery_codes), recovery[0].factor_id)


async def test_recovery_codes_are_strong_single_use_and_log_in(
        stub: Stub, user_id: str, fresh_clock: FixedClock, app: App) -> None:
    _, codes, recovery_id = await enroll_with_codes(stub, user_id, fresh_clock)
    assert len(codes) == 10
    group = r"[0-9a-hjkmnp-tv-z]{5}"
    assert all(re.fullmatch(f"{group}-{group}-{group}", c) for c in codes)  # 75 bits each

    async def use(code: str) -> pb.VerifyResponse:
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_BACKOFFICE))
        assert (ch.channel, ch.method) == (pb.CHANNEL_NONE, pb.METHOD_RECOVERY_CODE)
        return await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=code))

    first = await use(codes[0].upper().replace("-", " "))  # case and separators do not matter
    assert first.result == pb.VERIFY_RESULT_APPROVED
    assert first.session.method == pb.METHOD_RECOVERY_CODE
    assert (await use(codes[0])).result == pb.VERIFY_RESULT_INVALID_CODE  # used up
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert listed.recovery_codes_remaining == 9

    async with app.database.engine.connect() as conn:
        rows = (await conn.execute(select(recovery_codes).where(
            recovery_codes.c.user_id == user_id))).all()
    stored = b"".join(r.code_hash for r in rows)
    assert len(rows) == 10 and all(len(r.code_hash) == 32 for r in rows)
    assert not any(c.replace("-", "").encode() in stored for c in codes)


async def test_a_recovery_code_disables_a_lost_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor, codes, recovery_id = await enroll_with_codes(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_DISABLE,
        application=pb.APPLICATION_PORTAL))
    # Verify cannot use it to switch off the recovery codes themselves.
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=codes[3]))
    assert rich_error(err.value).reason == "ERROR_REASON_CHALLENGE_MISMATCH"
    done = await stub.Disable(pb.DisableRequest(user_id=user_id, factor_id=factor.factor_id,
                                                challenge_id=ch.challenge_id, code=codes[3]))
    assert done.result == pb.VERIFY_RESULT_APPROVED
    assert done.factor.factor_id == factor.factor_id
    assert done.factor.status == pb.FACTOR_STATUS_DISABLED
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert {f.method: f.status for f in listed.factors} == {
        pb.METHOD_AUTHENTICATOR_APP: pb.FACTOR_STATUS_DISABLED,
        pb.METHOD_RECOVERY_CODE: pb.FACTOR_STATUS_DISABLED}  # 2FA off: codes retired too
    assert listed.recovery_codes_remaining == 0


async def test_regenerating_codes_needs_a_proof_not_a_session(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor, old_codes, recovery_id = await enroll_with_codes(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    # A fresh session alone is refused: a stolen one must not mint codes.
    with pytest.raises(aio.AioRpcError) as err:
        await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
            user_id=user_id, session_token=session.session_token,
            application=pb.APPLICATION_PORTAL))
    assert rich_error(err.value).reason == "ERROR_REASON_PROOF_REQUIRED"
    proof = await regenerate_proof(stub, factor, fresh_clock)
    fresh = await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
        user_id=user_id, proof_challenge_id=proof, application=pb.APPLICATION_PORTAL))
    assert len(fresh.recovery_codes) == 10
    assert not set(fresh.recovery_codes) & set(old_codes)
    # The proof is used once; another user cannot use it either.
    for who in (user_id, "someone-else"):
        with pytest.raises(aio.AioRpcError) as err:
            await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
                user_id=who, proof_challenge_id=proof, application=pb.APPLICATION_PORTAL))
        assert rich_error(err.value).reason == "ERROR_REASON_PROOF_REQUIRED"
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=recovery_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    old = await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id, code=old_codes[0]))
    assert old.result == pb.VERIFY_RESULT_INVALID_CODE  # the old set is dead
    listed = await stub.ListFactors(pb.ListFactorsRequest(user_id=user_id))
    assert listed.recovery_codes_remaining == 10

    # A proof older than 10 minutes is stale.
    stale = await regenerate_proof(stub, factor, fresh_clock)
    fresh_clock.advance(10 * 60 + 1)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.RegenerateRecoveryCodes(pb.RegenerateRecoveryCodesRequest(
            user_id=user_id, proof_challenge_id=stale, application=pb.APPLICATION_PORTAL))
    e = rich_error(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                  "ERROR_REASON_PROOF_REQUIRED")


async def test_codes_come_only_with_the_first_factor(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor, _, _ = await enroll_with_codes(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    resp = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_EMAIL, email=f"{user_id}@example.com",
        application=pb.APPLICATION_PORTAL, session_token=session.session_token))
    assert resp.factor.status == pb.FACTOR_STATUS_PENDING
    with pytest.raises(aio.AioRpcError) as err:
        await stub.Enroll(pb.EnrollRequest(user_id=user_id, method=pb.METHOD_RECOVERY_CODE,
                                           application=pb.APPLICATION_PORTAL))
    assert rich_error(err.value).code == grpc.StatusCode.INVALID_ARGUMENT


# -- the audit trail --------------------------------------------------------------------------
async def test_audit_events_page_newest_first_with_the_callers_context(
        stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await open_login(stub, factor)
    await stub.Verify(pb.VerifyRequest(challenge_id=ch, code=totp_at(factor.secret, fresh_clock),
                                       client_ip="203.0.113.9", user_agent="Firefox/140"))
    first = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id, page_size=2))
    assert len(first.events) == 2 and first.next_page_token
    rest = await stub.ListAuditEvents(pb.ListAuditEventsRequest(
        user_id=user_id, page_size=500, page_token=first.next_page_token))
    events = list(first.events) + list(rest.events)
    assert not rest.next_page_token
    ids = [e.event_id for e in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    kinds = [e.event for e in reversed(events)]
    assert kinds[:2] == ["challenge_opened", "enroll"]  # oldest first here
    verify = next(e for e in events if e.event == "verify" and e.challenge_id == ch)
    assert (verify.outcome, verify.client_ip, verify.user_agent) == (
        "ok", "203.0.113.9", "Firefox/140")
    assert verify.detail["result"] == "approved"
    assert verify.application == pb.APPLICATION_PORTAL
    assert {"enroll", "factor_confirmed", "recovery_codes_issued", "challenge_opened",
            "verify", "session_created"} <= set(kinds)

    later = await stub.ListAuditEvents(pb.ListAuditEventsRequest(
        user_id=user_id, start_time=events[0].occurred_at))
    assert all(e.occurred_at.ToDatetime() >= events[0].occurred_at.ToDatetime()
               for e in later.events)
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id,
                                                             page_token="garbage!"))
    assert rich_error(err.value).field_violations.keys() == {"page_token"}


# -- callers ----------------------------------------------------------------------------------
class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = Authority()
        self.root = root
        (root / "ca.crt").write_bytes(self.ca.cert_pem)
        self.server_cert, self.server_key = write(root, "server",
                                                  self.ca.issue("localhost", server=True))
        self.portal_token, portal_hash = new_token()
        self.backoffice_token, backoffice_hash = new_token()
        self.auditor_token, auditor_hash = new_token()
        self.callers = root / "callers.toml"
        self.callers.write_text(f"""
[[callers]]
name = "portal-backend"
applications = ["portal"]
token_sha256 = ["{portal_hash}"]
certificate_names = ["portal.internal"]

[[callers]]
name = "backoffice-backend"
applications = ["backoffice", "portal"]
token_sha256 = ["{backoffice_hash}"]
certificate_names = ["backoffice.internal"]
audit_reader = true

[[callers]]
name = "auditor"
applications = []
token_sha256 = ["{auditor_hash}"]
audit_reader = true
""")

    def client_credentials(self, name: str | None = None,
                           authority: Authority | None = None) -> grpc.ChannelCredentials:
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem)
        leaf = (authority or self.ca).issue(name, server=False)
        return grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem,
                                            private_key=leaf.key, certificate_chain=leaf.cert)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def tls_server(pki: Pki, database_url: str,
                     fresh_clock: FixedClock) -> AsyncIterator[App]:
    app = await create_server(make_settings(
        database_url, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
        callers_file=pki.callers), clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    yield app
    await app.stop(0)


@pytest.fixture
async def mtls_server(pki: Pki, database_url: str,
                      fresh_clock: FixedClock) -> AsyncIterator[App]:
    app = await create_server(make_settings(
        database_url, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
        tls_client_ca_file=pki.root / "ca.crt", callers_file=pki.callers),
        clock=fresh_clock, keyring=Keyring.parse(TEST_KEYRING))
    yield app
    await app.stop(0)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def test_bearer_tokens_name_the_caller_and_its_applications(
        tls_server: App, pki: Pki, user_id: str, fresh_clock: FixedClock) -> None:
    async with aio.secure_channel(f"localhost:{tls_server.port}",
                                  pki.client_credentials()) as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        enroll = pb.EnrollRequest(user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
                                  application=pb.APPLICATION_BACKOFFICE)
        for metadata, reason in [((), "ERROR_REASON_CALLER_UNAUTHENTICATED"),
                                 (bearer("mfa_not-a-token"), "ERROR_REASON_CALLER_UNAUTHENTICATED"),
                                 ((("authorization", "Basic abc"),),
                                  "ERROR_REASON_CALLER_UNAUTHENTICATED")]:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.Enroll(enroll, metadata=metadata)
            e = rich_error(err.value)
            assert (e.code, e.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)

        # The portal's caller may not act for the backoffice...
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Enroll(enroll, metadata=bearer(pki.portal_token))
        e = rich_error(err.value)
        assert (e.code, e.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                      "ERROR_REASON_APPLICATION_NOT_ALLOWED")
        # ...the backoffice's may.
        resp = await stub.Enroll(enroll, metadata=bearer(pki.backoffice_token))
        ok = await stub.Verify(pb.VerifyRequest(
            challenge_id=resp.challenge_id, code=totp_at(resp.totp_secret, fresh_clock)),
            metadata=bearer(pki.backoffice_token))
        fresh_clock.advance(30)
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_BACKOFFICE), metadata=bearer(pki.backoffice_token))
        # A challenge opened for the backoffice cannot be verified by the portal's caller.
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Verify(pb.VerifyRequest(challenge_id=ch.challenge_id,
                                               code=totp_at(resp.totp_secret, fresh_clock)),
                              metadata=bearer(pki.portal_token))
        assert rich_error(err.value).code == grpc.StatusCode.PERMISSION_DENIED
        login_ok = await stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(resp.totp_secret, fresh_clock)),
            metadata=bearer(pki.backoffice_token))
        assert ok.result == login_ok.result == pb.VERIFY_RESULT_APPROVED
        # CheckSession answers the portal about a backoffice session (one login, both apps).
        check = await stub.CheckSession(pb.CheckSessionRequest(
            session_token=login_ok.session.session_token, application=pb.APPLICATION_PORTAL),
            metadata=bearer(pki.portal_token))
        assert check.valid and check.application == pb.APPLICATION_BACKOFFICE
        # Only audit readers read the audit trail.
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id),
                                       metadata=bearer(pki.portal_token))
        e = rich_error(err.value)
        assert (e.code, e.reason) == (grpc.StatusCode.PERMISSION_DENIED,
                                      "ERROR_REASON_CALLER_NOT_ALLOWED")
        events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id),
                                            metadata=bearer(pki.backoffice_token))
        assert {e.caller for e in events.events} == {"backoffice-backend"}
        # Health stays open for probes.
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_names_the_caller_by_its_certificate(
        mtls_server: App, pki: Pki, user_id: str) -> None:
    target = f"localhost:{mtls_server.port}"
    enroll = pb.EnrollRequest(user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
                              application=pb.APPLICATION_PORTAL)
    async with aio.secure_channel(target, pki.client_credentials("portal.internal")) as ch:
        resp = await pb_grpc.TwoFactorServiceStub(ch).Enroll(enroll)
        assert resp.factor.status == pb.FACTOR_STATUS_PENDING
        enroll.application = pb.APPLICATION_BACKOFFICE
        with pytest.raises(aio.AioRpcError) as err:
            await pb_grpc.TwoFactorServiceStub(ch).Enroll(enroll)
        assert rich_error(err.value).code == grpc.StatusCode.PERMISSION_DENIED
    # A certificate from the right CA that names nobody we know.
    async with aio.secure_channel(target, pki.client_credentials("stranger.internal")) as ch:
        with pytest.raises(aio.AioRpcError) as err:
            await pb_grpc.TwoFactorServiceStub(ch).Enroll(enroll)
        assert rich_error(err.value).code == grpc.StatusCode.UNAUTHENTICATED
    # A certificate from another CA, or none at all, does not get through the handshake.
    for creds in (pki.client_credentials("portal.internal", Authority("rogue-ca")),
                  pki.client_credentials()):
        async with aio.secure_channel(target, creds) as ch:
            with pytest.raises(aio.AioRpcError) as err:
                await pb_grpc.TwoFactorServiceStub(ch).Enroll(enroll, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_callers_file_is_validated(tmp_path: Path, database_url: str) -> None:
    bad = tmp_path / "callers.toml"
    for text, message in [
        ("[[callers]]\nname = 'x'\n", "give token_sha256 or certificate_names"),
        ("[[callers]]\nname = 'x'\ntoken_sha256 = ['abc']\n", "64 hex"),
        ("[[callers]]\nname = 'x'\napplications = ['crm']\ncertificate_names = ['a']\n",
         "applications"),
        ("", "no caller"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigurationError, match=message):
            await create_server(make_settings(database_url, callers_file=bad),
                                keyring=Keyring.parse(TEST_KEYRING))


# -- start-up refusals ------------------------------------------------------------------------


async def test_a_caller_without_an_application_reads_the_audit_and_nothing_else(
        tls_server: App, pki: Pki, user_id: str, fresh_clock: FixedClock) -> None:
    """An audit reader configured with ``applications = []`` may not list a user's
    factors nor log anyone out; the audit row of a logout names the caller that did it."""
    async with aio.secure_channel(f"localhost:{tls_server.port}",
                                  pki.client_credentials()) as channel:
        stub: Stub = pb_grpc.TwoFactorServiceStub(channel)
        portal, backoffice, auditor = (bearer(pki.portal_token), bearer(pki.backoffice_token),
                                       bearer(pki.auditor_token))
        resp = await stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_BACKOFFICE), metadata=backoffice)
        await stub.Verify(pb.VerifyRequest(challenge_id=resp.challenge_id,
                                           code=totp_at(resp.totp_secret, fresh_clock)),
                          metadata=backoffice)
        fresh_clock.advance(30)
        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=resp.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_BACKOFFICE), metadata=backoffice)
        session = (await stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(resp.totp_secret, fresh_clock)),
            metadata=backoffice)).session

        denied = (grpc.StatusCode.PERMISSION_DENIED, "ERROR_REASON_APPLICATION_NOT_ALLOWED")
        for call in (
                stub.ListFactors(pb.ListFactorsRequest(user_id=user_id), metadata=auditor),
                stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id), metadata=auditor),
                stub.RevokeSession(pb.RevokeSessionRequest(
                    session_token=session.session_token), metadata=auditor),
                stub.CheckSession(pb.CheckSessionRequest(
                    session_token=session.session_token, application=pb.APPLICATION_PORTAL),
                    metadata=auditor)):
            with pytest.raises(aio.AioRpcError) as err:
                await call
            e = rich_error(err.value)
            assert (e.code, e.reason) == denied
        assert (await stub.CheckSession(pb.CheckSessionRequest(
            session_token=session.session_token, application=pb.APPLICATION_PORTAL),
            metadata=portal)).valid  # nothing was revoked
        events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id),
                                            metadata=auditor)
        assert events.events

        # The portal's caller logs the user out everywhere: the row names the portal.
        revoked = await stub.RevokeSession(pb.RevokeSessionRequest(user_id=user_id),
                                           metadata=portal)
        assert revoked.revoked_count == 1
        events = await stub.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id),
                                            metadata=auditor)
        [row] = [e for e in events.events if e.event == "session_revoked"]
        assert (row.caller, row.application) == ("portal-backend", pb.APPLICATION_PORTAL)
        assert row.detail["session_application"] == "backoffice"


async def test_development_without_callers_stays_on_loopback(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match="loopback only"):
        await create_server(make_settings(database_url, listen_addr="0.0.0.0:0"),
                            keyring=Keyring.parse(TEST_KEYRING))
