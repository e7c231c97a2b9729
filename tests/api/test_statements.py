"""The store contract: how many statements each RPC sends to the database.

Statements are what a request pays for on PostgreSQL (a round trip each, and several times
the database's own work in client CPU: docs/BENCHMARKS.md, "Baselines"). Each hot path has a budget,
asserted exactly here on both databases so it cannot grow back silently:

- CheckSession: 1 (the idle deadline is written at most once a minute per session: 2,
  on PostgreSQL on the same autocommit connection, without BEGIN and COMMIT);
- Challenge on the app: 2 (the user's lock with the factor, the deferred writes as one);
- Verify of a TOTP login: 2 (the lock with the challenge and its factor, the deferred
  writes: the attempt that closes it, TOTP step, session, audit rows).
- Verify of a passkey login: as many (the new sign counter rides in the deferred UPDATE).
- RecognizeDevice (a remembered browser): 3 (the user's lock, the UPDATE that recognises
  the device, the deferred writes); 5 with a client address (its lock and its count).
- Challenge by phone: 5 (the user's lock with the factor, the destination/range/country locks
  in one statement, the send counts in one, the daily budget's conditional UPDATE, the
  deferred writes). The budget is a statement of its own: it must run after the counts
  passed (a refused send takes nothing), and it cannot join them, whose snapshot would
  then predate the wait for the budget row.

Counted with SQLAlchemy's ``before_cursor_execute`` hook on the server's engine. PostgreSQL
reads run in autocommit (no BEGIN/COMMIT); writing transactions add asyncpg's BEGIN and
COMMIT, which are not cursor executions, except a login's Challenge and Verify, which try
first without the lock: their read and their writes are each a statement of its own, in
autocommit (store/unit.py, "optimistic"; tests/api/test_optimistic.py). SQLite is
embedded (a statement is a function call, not a round trip): its deferred writes go one
per table, and its ``BEGIN IMMEDIATE`` is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from mfa.v1 import two_factor_service_pb2 as pb

from mfa_service.app import App
from mfa_service.clock import FixedClock
from tests.support.client import enroll_app, login, totp_at
from tests.support.replica import Replica
from tests.support.rig import Rig, enroll_phone
from tests.support.statements import counting

if TYPE_CHECKING:
    from mfa.v1.two_factor_service_pb2_grpc import TwoFactorServiceAsyncStub as Stub

T = TypeVar("T")


# On SQLite the count is per engine, not per call: one pass of the outbox dispatcher
# (BEGIN and its SELECT of due messages) can land in it on a loaded machine.
SQLITE_BACKGROUND = 2


def within(app: App, n: int, postgres: int, sqlite: int) -> bool:
    """Exactly the PostgreSQL budget; on SQLite at most its own, give or take a background
    pass (statements there are function calls, not round trips)."""
    if app.database.engine.dialect.name == "postgresql":
        return n == postgres
    return n <= sqlite + SQLITE_BACKGROUND


async def test_hot_paths_stay_within_their_statement_budget(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    factor = await enroll_app(stub, user_id, fresh_clock)
    session = await login(stub, factor, fresh_clock)
    check = pb.CheckSessionRequest(session_token=session.session_token,
                                   application=pb.APPLICATION_BACKOFFICE)
    if app.revocations is not None:  # PostgreSQL: the session cache, once it listens
        await Replica(app, stub).cache_on()
    with counting(app) as statements:
        answer, n = await statements.count(stub.CheckSession(check))
        assert answer.valid
        assert within(app, n, 1, 2), statements.sql  # SQLite: BEGIN (deferred) + SELECT

        fresh_clock.advance(5 * 60)  # the idle deadline moves by more than a minute
        answer, n = await statements.count(stub.CheckSession(check))
        assert answer.valid
        # The UPDATE of the idle deadline. PostgreSQL: alone, as the session is cached
        # (tests/api/test_session_cache.py); SQLite (no cache): the read, then the UPDATE
        # in a transaction of its own.
        assert within(app, n, 1, 4), statements.sql

        ch, n = await statements.count(stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL)))
        # PostgreSQL: the user lock with the factor (one statement), the deferred writes.
        assert within(app, n, 2, 6), statements.sql

        ok, n = await statements.count(stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock))))
        assert ok.result == pb.VERIFY_RESULT_APPROVED
        # PostgreSQL: the user lock with the read (one statement), then the deferred writes
        # with the attempt (a guard) as one.
        assert within(app, n, 2, 7), statements.sql


async def test_other_rpcs_statement_counts(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Not hot paths, but a count that grows is a change someone should notice."""
    with counting(app) as statements:
        enrolled, n = await statements.count(stub.Enroll(pb.EnrollRequest(
            user_id=user_id, method=pb.METHOD_AUTHENTICATOR_APP,
            application=pb.APPLICATION_PORTAL)))
        assert within(app, n, 4, 8), statements.sql

        confirmed, n = await statements.count(stub.Verify(pb.VerifyRequest(
            challenge_id=enrolled.challenge_id,
            code=totp_at(enrolled.totp_secret, fresh_clock))))
        assert confirmed.result == pb.VERIFY_RESULT_APPROVED
        first_confirm = n
        fresh_clock.advance(30)

        listed, n = await statements.count(stub.ListFactors(pb.ListFactorsRequest(
            user_id=user_id)))
        assert len(listed.factors) == 2
        assert within(app, n, 1, 2), statements.sql

        ch = await stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL))
        wrong = f"{(int(totp_at(enrolled.totp_secret, fresh_clock)) + 1) % 10**6:06d}"
        failed, n = await statements.count(stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=wrong)))
        assert failed.result == pb.VERIFY_RESULT_INVALID_CODE
        assert within(app, n, 2, 7), statements.sql  # the lock with the read, the writes

        session = await login(stub, _factor(enrolled, user_id), fresh_clock)
        revoked, n = await statements.count(stub.RevokeSession(pb.RevokeSessionRequest(
            session_token=session.session_token)))
        assert revoked.revoked_count == 1
        assert within(app, n, 3, 3), statements.sql  # PostgreSQL: + NOTIFY for the caches
    # Confirming the first factor issues the recovery codes too: bounded, not hot.
    assert first_confirm <= (13 if app.database.engine.dialect.name == 'postgresql' else 16)


async def test_a_passkey_login_costs_what_a_totp_login_costs(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """The new sign counter rides in the login's deferred UPDATE of the factor row."""
    from tests.support.softauthn import SoftAuthenticator
    key = SoftAuthenticator()
    enrolled = await stub.Enroll(pb.EnrollRequest(
        user_id=user_id, method=pb.METHOD_PASSKEY, application=pb.APPLICATION_PORTAL))
    await stub.Verify(pb.VerifyRequest(
        challenge_id=enrolled.challenge_id,
        webauthn_response=key.create(enrolled.webauthn_creation_options)))
    with counting(app) as statements:
        ch, n = await statements.count(stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
            application=pb.APPLICATION_PORTAL)))
        assert within(app, n, 2, 6), statements.sql
        ok, n = await statements.count(stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options))))
        assert ok.result == pb.VERIFY_RESULT_APPROVED
        assert within(app, n, 2, 7), (n, statements.sql)
    # And the counter was stored: the same counter again is refused.
    key.counter = key.counter
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=enrolled.factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    replay = await stub.Verify(pb.VerifyRequest(
        challenge_id=ch.challenge_id, webauthn_response=key.get(ch.webauthn_request_options)))
    assert replay.result == pb.VERIFY_RESULT_INVALID_CODE


def _factor(resp: pb.EnrollResponse, user_id: str) -> Any:
    from tests.support.client import AppFactor

    return AppFactor(resp.factor.factor_id, resp.totp_secret, user_id)


@pytest.fixture(autouse=True)
def _no_dispatcher(app: App) -> None:
    """The shared server queues messages only: its dispatcher sends nothing meanwhile."""
    assert not app.settings.outbox_dispatcher


async def test_a_phone_challenge_costs_five_statements(rig: Rig, user_id: str) -> None:
    factor_id, _ = await enroll_phone(rig, user_id)
    with counting(rig.app) as statements:
        ch, n = await statements.count(rig.stub.Challenge(pb.ChallengeRequest(
            user_id=user_id, factor_id=factor_id, purpose=pb.PURPOSE_LOGIN,
            channel=pb.CHANNEL_VOICE, application=pb.APPLICATION_PORTAL)))
    assert ch.channel == pb.CHANNEL_VOICE
    # This rig's outbox dispatcher wakes at the COMMIT and claims the message in a
    # task of its own: only the RPC's statements (the task that took the user's lock)
    # are counted.
    [rpc] = {t for t, sql in statements.seen if "INSERT INTO user_lockouts" in sql}
    n = len([sql for t, sql in statements.seen if t == rpc])
    # SQLite: no advisory locks; BEGIN IMMEDIATE and one INSERT per table instead.
    assert within(rig.app, n, 5, 10), statements.sql


async def test_a_remembered_browser_costs_what_a_login_costs(
        app: App, stub: Stub, user_id: str, fresh_clock: FixedClock) -> None:
    """Remembering a browser costs a login and one UPDATE (5).
    RecognizeDevice: the user's lock, one conditional UPDATE that finds the live device
    and slides its idle deadline, the deferred writes (session, audit) as one: 3; with a
    client address, its advisory lock and its count of unknown tokens: 5. The session it
    opens is checked by the same single read as any other."""
    factor = await enroll_app(stub, user_id, fresh_clock)
    ch = await stub.Challenge(pb.ChallengeRequest(
        user_id=user_id, factor_id=factor.factor_id, purpose=pb.PURPOSE_LOGIN,
        application=pb.APPLICATION_PORTAL))
    with counting(app) as statements:
        # A TOTP login (2) that also makes room among the user's browsers (1 UPDATE); the
        # device row rides in the deferred writes.
        remembered, n = await statements.count(stub.Verify(pb.VerifyRequest(
            challenge_id=ch.challenge_id, code=totp_at(factor.secret, fresh_clock),
            remember_device=True, device_label="Browser")))
        assert remembered.device_token
        assert within(app, n, 3, 9), statements.sql
        recognize = pb.RecognizeDeviceRequest(user_id=user_id,
                                              device_token=remembered.device_token,
                                              application=pb.APPLICATION_PORTAL)
        back, n = await statements.count(stub.RecognizeDevice(recognize))
        assert back.recognized
        assert within(app, n, 3, 6), statements.sql
        recognize.client_ip = "192.0.2.10"
        back, n = await statements.count(stub.RecognizeDevice(recognize))
        assert back.recognized
        assert within(app, n, 5, 8), statements.sql
        answer, n = await statements.count(stub.CheckSession(pb.CheckSessionRequest(
            session_token=back.session.session_token, application=pb.APPLICATION_PORTAL)))
        assert answer.valid and answer.trusted_device
        assert within(app, n, 1, 2), statements.sql
