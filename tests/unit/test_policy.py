"""The proof model's table (service/policy.py) on its own: docs/SECURITY.md shows it, every
row allows each of its alternatives and refuses what it calls never enough, and a refusal
names what is missing. (Each row through the real server: tests/api/test_policy.py.)"""

from __future__ import annotations

import itertools

import pytest
from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.errors import FailedPrecondition
from mfa_service.service import policy
from mfa_service.service.policy import TABLE, Change, Evidence
from tests.support.config import REPO

DOCS = REPO / "docs" / "SECURITY.md"


def test_security_md_shows_the_table_the_code_enforces() -> None:
    assert policy.markdown_table() in DOCS.read_text(), (
        "docs/SECURITY.md differs from service/policy.py: paste "
        "`python -m mfa_service.service.policy` into it")


@pytest.mark.parametrize("change", list(Change))
def test_every_row_allows_each_of_its_alternatives(change: Change) -> None:
    for alternative in TABLE[change].needs:
        assert policy.allows(change, alternative)
        policy.require(change, alternative)


@pytest.mark.parametrize("change", list(Change))
def test_every_row_refuses_what_it_calls_never_enough(change: Change) -> None:
    for weak in TABLE[change].never_enough:
        assert not policy.allows(change, {weak, Evidence.PASSWORD_STEP})
        with pytest.raises(FailedPrecondition):
            policy.require(change, {weak, Evidence.PASSWORD_STEP})


def test_no_single_weak_kind_of_evidence_satisfies_a_row_that_names_it_never_enough() -> None:
    # Pairs too: a stale session with a new factor's proof still removes nothing.
    rule = TABLE[Change.DISABLE_FACTOR]
    for pair in itertools.combinations(rule.never_enough, 2):
        assert not policy.allows(Change.DISABLE_FACTOR, pair)
    rule = TABLE[Change.REGENERATE_RECOVERY_CODES]
    for pair in itertools.combinations(rule.never_enough, 2):
        assert not policy.allows(Change.REGENERATE_RECOVERY_CODES, pair)


def test_a_refusal_says_what_is_missing() -> None:

    def name(change: Change, shown: set[Evidence]) -> str:
        with pytest.raises(FailedPrecondition) as err:
            policy.require(change, shown)
        return ErrorReason.Name(err.value.reason)

    assert name(Change.ADD_FACTOR, {Evidence.SESSION}) == "ERROR_REASON_RECENT_SESSION_REQUIRED"
    assert name(Change.CHANGE_PHONE, {Evidence.FRESH_SESSION}) == (
        "ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED")
    assert name(Change.CHANGE_PHONE, {Evidence.PROOF_WITH_OLD_PHONE}) == (
        "ERROR_REASON_RECENT_SESSION_REQUIRED")
    assert name(Change.DISABLE_FACTOR, {Evidence.NEW_RECOVERY_CODE}) == (
        "ERROR_REASON_CREDENTIAL_TOO_NEW")
    assert name(Change.DISABLE_FACTOR, {Evidence.PROOF_WITH_ESTABLISHED}) == (
        "ERROR_REASON_CHALLENGE_MISMATCH")
    assert name(Change.REGENERATE_RECOVERY_CODES, {Evidence.PROOF_WITH_NEW}) == (
        "ERROR_REASON_CREDENTIAL_TOO_NEW")
    assert name(Change.REGENERATE_RECOVERY_CODES, {Evidence.FRESH_SESSION}) == (
        "ERROR_REASON_PROOF_REQUIRED")
    assert name(Change.CONFIRM_PENDING, {Evidence.PROOF_WITH_TARGET}) == (
        "ERROR_REASON_ENROLLING_SESSION_ENDED")


def test_a_remembered_browsers_session_is_weaker_than_a_session_from_a_code() -> None:
    """A session from a code vouches for everything a remembered browser's session does,
    never the reverse, and the latter satisfies no row that changes anything."""
    trusted = Evidence.TRUSTED_DEVICE_SESSION
    assert trusted in policy.implied({Evidence.SESSION})
    assert trusted in policy.implied({Evidence.FRESH_SESSION})  # through SESSION
    assert policy.implied({trusted}) == {trusted}
    changes = [c for c in Change if c not in (Change.END_SESSION, Change.END_ALL_SESSIONS,
                                              Change.FORGET_DEVICE, Change.ADD_FIRST_FACTOR,
                                              Change.RENEW_FIRST_PENDING)]
    for change in changes:
        assert not policy.allows(change, {trusted, Evidence.PASSWORD_STEP}), change
    # Where a fresh session is asked for, it is refused as a stale one would be.
    with pytest.raises(FailedPrecondition) as err:
        policy.require(Change.ADD_FACTOR, {trusted, Evidence.PASSWORD_STEP})
    assert ErrorReason.Name(err.value.reason) == "ERROR_REASON_RECENT_SESSION_REQUIRED"


def test_only_a_real_factor_remembers_a_browser() -> None:
    assert policy.allows(Change.REMEMBER_DEVICE, {Evidence.PROOF_WITH_ACTIVE})
    assert policy.allows(Change.REMEMBER_DEVICE, {Evidence.PROOF_WITH_NEW})  # a login is
    with pytest.raises(FailedPrecondition) as err:
        policy.require(Change.REMEMBER_DEVICE, {Evidence.RECOVERY_CODE})
    assert ErrorReason.Name(err.value.reason) == "ERROR_REASON_REMEMBER_DEVICE_NOT_ALLOWED"
    # The browser's token logs in without a code; a password alone does not.
    assert policy.allows(Change.LOG_IN_REMEMBERED, {Evidence.DEVICE_TOKEN})
    assert not policy.allows(Change.LOG_IN, {Evidence.DEVICE_TOKEN})
