"""The security rules that need no server: the lockout policy (its waits, its reset, the
administrator's part), the production start-up refusals, and a caller context that grants
nothing. (Through the generated client: tests/api/test_security.py.)"""

from __future__ import annotations

import contextvars
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from mfa_service.domain import Application, AuditContext
from mfa_service.errors import InvalidArgument, PermissionDenied
from mfa_service.service.lockout import LockoutPolicy
from mfa_service.settings import Settings
from mfa_service.store.security import LockoutState
from mfa_service.transport.interceptors import caller_var
from tests.support.config import TEST_KEYRING

T = datetime(2026, 1, 1, tzinfo=UTC)


def fail(policy: LockoutPolicy, state: LockoutState, times: int,
         at: datetime) -> tuple[LockoutState, list[bool]]:
    locks = []
    for _ in range(times):
        state, locked = policy.after_failure(state, at)
        locks.append(locked)
    return state, locks


def test_lockout_waits_double_from_one_to_fifteen_minutes() -> None:
    policy, state = LockoutPolicy(), LockoutPolicy.after_success()
    waits = []
    for _ in range(6):
        state, locks = fail(policy, state, 5, T)
        assert locks == [False, False, False, False, True]
        assert state.locked_until is not None
        waits.append((state.locked_until - T).total_seconds() / 60)
    assert waits == [1, 2, 4, 8, 15, 15]
    assert policy.refusal(state, T) == 15 * 60
    assert policy.refusal(state, T + timedelta(minutes=15)) is None


def test_quiet_twelve_hours_resets_the_count() -> None:
    policy = LockoutPolicy()
    state, _ = fail(policy, LockoutPolicy.after_success(), 4, T)
    state, locks = fail(policy, state, 4, T + timedelta(hours=12))
    assert locks == [False] * 4
    assert state.consecutive_failures == 4


def test_one_hundred_failures_need_an_administrator() -> None:
    policy = LockoutPolicy()
    state, locks = fail(policy, LockoutPolicy.after_success(), 100, T)
    assert locks[-1] is True
    assert state.admin_reset_required
    assert policy.refusal(state, T + timedelta(days=30)) == 0  # 0: wait does not help


def test_production_says_everything_it_needs() -> None:
    with pytest.raises(ValidationError) as err:
        Settings.model_validate({"env": "production"})
    message = str(err.value)
    for needed in ("MFA_TLS_CERT_FILE", "MFA_CALLERS_FILE", "MFA_KEYRING",
                   "MFA_EMAIL_PROVIDER=console", "MFA_PHONE_PROVIDER=console"):
        assert needed in message


def test_production_settings_that_are_complete_are_accepted() -> None:
    etc = Path("/etc/mfa-service")  # named, never read: validation does not open the files
    settings = Settings.model_validate({
        "env": "production", "keyring": TEST_KEYRING, "tls_cert_file": etc / "c",
        "tls_key_file": etc / "k", "callers_file": etc / "callers.toml",
        "email_provider": "smtp", "phone_provider": "webhook",
        "phone_webhook_url": "https://sms.internal/send", "webauthn_rp_id": "example.com",
        "webauthn_origins": "https://portal.example.com,https://backoffice.example.com"})
    assert settings.env == "production"


def test_a_call_that_was_never_authenticated_may_do_nothing() -> None:
    """The default caller context grants nothing: a path that forgets to authenticate
    fails closed, not open."""
    caller = contextvars.Context().run(caller_var.get)
    assert (caller.applications, caller.audit_reader) == (frozenset(), False)
    who = AuditContext(caller="forgot-to-say")
    for application in Application:
        with pytest.raises(PermissionDenied):
            who.authorize(application)
    with pytest.raises(PermissionDenied):
        who.authorize_any()


def test_recovery_codes_issued_before_75_bits_still_work_and_nothing_between() -> None:
    """The 10-character codes (50 bits) users saved before still normalise to what was
    hashed then; a length between the two is a typo, refused without a guess counted."""
    from mfa_service.factors.recovery import normalise
    assert normalise("ABCDE-23456") == "abcde23456"
    assert normalise("abcde 23456 fghjk") == "abcde23456fghjk"
    for wrong in ("abcde-2345", "abcde-23456-f", "abcde-23456-fghjkm"):
        with pytest.raises(InvalidArgument):
            normalise(wrong)


def test_recovery_codes_carry_75_bits_in_every_symbol() -> None:
    """Each symbol is 5 of the random bits: the alphabet has exactly 32 symbols, every one
    appears, and the 15 symbols of a code come from 75 distinct bits (a generator that
    returns one bit set at a time moves exactly one symbol)."""
    from mfa_service.factors.recovery import ALPHABET, CODE_CHARS, generate_codes

    assert len(set(ALPHABET)) == 32 and CODE_CHARS * 5 == 75
    seen = {ch for code in generate_codes(200) for ch in code.replace("-", "")}
    assert seen == set(ALPHABET)
    zero = generate_codes(1, randbits=lambda n: 0)[0].replace("-", "")
    assert zero == ALPHABET[0] * 15
    for bit in range(75):
        def one_bit(n: int, b: int = bit) -> int:
            return 1 << b

        code = generate_codes(1, randbits=one_bit)[0].replace("-", "")
        changed = [i for i, ch in enumerate(code) if ch != ALPHABET[0]]
        assert changed == [bit // 5] and code[bit // 5] == ALPHABET[1 << (bit % 5)]
