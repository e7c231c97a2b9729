"""The steps a verification is made of (service/attempts.py), checked as values, without
a server or a database: which challenges take an attempt, in which order the refusals
come, and that a recovery code passes the lockout's hard limit where a code does not."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mfa_service.crypto import Keyring
from mfa_service.domain import (
    Application,
    AuditContext,
    Challenge,
    ChallengeState,
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    Method,
    Proof,
    Purpose,
    VerifyResult,
)
from mfa_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from mfa_service.factors.recovery import RecoveryCodes
from mfa_service.factors.registry import FactorRegistry
from mfa_service.factors.totp import AuthenticatorApp
from mfa_service.service.attempts import Closed, Loaded, Ready, Steps, closed_outcome
from mfa_service.service.lockout import Lockout, LockoutPolicy
from mfa_service.service.notices import Notifier, nothing_else
from mfa_service.service.rules import Rules
from mfa_service.store.security import LockoutState

NOW = datetime(2026, 3, 2, 10, 0, 15, tzinfo=UTC)
KEYRING = Keyring.parse("t-1:" + "A" * 43)
PORTAL = AuditContext(caller="portal", applications=frozenset({Application.PORTAL}))
CLEAR = LockoutPolicy.after_success()


def steps() -> Steps:
    registry = FactorRegistry([AuthenticatorApp(KEYRING, "Test", 1), RecoveryCodes(KEYRING)])
    notifier = Notifier(KEYRING, "Test", timedelta(days=1), "en", on_factor_change=nothing_else)
    return Steps(registry, Rules(), Lockout(notifier, LockoutPolicy()), {})


def loaded(method: Method = Method.AUTHENTICATOR_APP, *,
           status: FactorStatus = FactorStatus.ACTIVE, purpose: Purpose = Purpose.LOGIN,
           state: ChallengeState = ChallengeState.OPEN, attempts: int = 0,
           expires_in: timedelta = timedelta(minutes=5),
           lockout: LockoutState = CLEAR) -> Loaded:
    factor = Factor("f1", "u1", method, status, "app", NOW - timedelta(minutes=1))
    record = FactorRecord(factor, "app", None, None, None, None)
    challenge = Challenge("c1", "u1", "f1", purpose, Application.PORTAL, Channel.NONE, state,
                          attempts, 5, NOW - timedelta(minutes=1), NOW + expires_in)
    return Loaded(challenge, record, lockout)


def test_an_open_challenge_is_ready_with_the_code_parsed() -> None:
    ready = steps().ready(loaded(), Proof(code="123 456"), PORTAL, NOW)
    assert isinstance(ready, Ready)
    assert ready.code == "123456"
    assert ready.method.method is Method.AUTHENTICATOR_APP


@pytest.mark.parametrize(("state", "attempts", "expires_in", "result", "left"), [
    (ChallengeState.APPROVED, 1, timedelta(minutes=5), VerifyResult.ALREADY_USED, 0),
    (ChallengeState.SUPERSEDED, 0, timedelta(minutes=5), VerifyResult.ALREADY_USED, 0),
    (ChallengeState.EXHAUSTED, 5, timedelta(minutes=5), VerifyResult.MAX_ATTEMPTS_REACHED, 0),
    (ChallengeState.OPEN, 2, timedelta(0), VerifyResult.EXPIRED, 3),
])
def test_a_challenge_that_takes_no_attempt_says_why(
        state: ChallengeState, attempts: int, expires_in: timedelta, result: VerifyResult,
        left: int) -> None:
    ready = steps().ready(loaded(state=state, attempts=attempts, expires_in=expires_in),
                          Proof(code="123456"), PORTAL, NOW)
    assert isinstance(ready, Closed)
    assert (ready.outcome.result, ready.outcome.attempts_remaining) == (result, left)


def test_a_pending_factor_past_its_time_is_an_expired_challenge() -> None:
    old = loaded(status=FactorStatus.PENDING, purpose=Purpose.CONFIRM_ENROLLMENT)
    old = replace(old, record=replace(old.record, factor=replace(
        old.record.factor, created_at=NOW - Rules().pending_ttl)))
    ready = steps().ready(old, Proof(code="123456"), PORTAL, NOW)
    assert isinstance(ready, Closed) and ready.outcome.result is VerifyResult.EXPIRED


def test_refusals_come_before_any_attempt() -> None:
    s = steps()
    with pytest.raises(PermissionDenied):  # another application's challenge
        s.ready(loaded(), Proof(code="123456"),
                AuditContext(caller="bo", applications=frozenset({Application.BACKOFFICE})),
                NOW)
    with pytest.raises(InvalidArgument):  # not a code at all: no guess counted
        s.ready(loaded(), Proof(code="12ab"), PORTAL, NOW)
    with pytest.raises(FailedPrecondition):  # a LOGIN on a PENDING factor
        s.ready(loaded(status=FactorStatus.PENDING), Proof(code="123456"), PORTAL, NOW)
    locked = LockoutState(5, NOW, NOW + timedelta(minutes=1), False)
    with pytest.raises(ResourceExhausted):
        s.ready(loaded(lockout=locked), Proof(code="123456"), PORTAL, NOW)


def test_past_the_hard_limit_only_a_recovery_code_is_ready() -> None:
    hard = LockoutState(100, NOW, None, True)
    s = steps()
    with pytest.raises(FailedPrecondition):
        s.ready(loaded(lockout=hard), Proof(code="123456"), PORTAL, NOW)
    ready = s.ready(loaded(Method.RECOVERY_CODE, lockout=hard),
                    Proof(code="abcde-23456"), PORTAL, NOW)
    assert isinstance(ready, Ready)


def test_closed_outcome_orders_used_before_exhausted_before_expired() -> None:
    c = loaded(state=ChallengeState.APPROVED, attempts=5, expires_in=timedelta(0)).challenge
    assert closed_outcome(c).result is VerifyResult.ALREADY_USED
    assert closed_outcome(replace(c, state=ChallengeState.OPEN)).result is (
        VerifyResult.MAX_ATTEMPTS_REACHED)
    assert closed_outcome(replace(c, state=ChallengeState.OPEN, attempts=1)).result is (
        VerifyResult.EXPIRED)
