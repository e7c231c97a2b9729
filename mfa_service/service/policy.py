"""The proof model: what each change to a user's factors, sessions or recovery codes needs.

Twice the worst bug of this service was a rule enforced in one RPC and forgotten in its
sibling (adding a factor without proof; finishing a PENDING passkey through Challenge).
So the rules are one table, held here as data (``TABLE``). Every use case that changes
a factor, a session or recovery codes first gathers the evidence the caller presented,
already checked (a session looked up under the user's lock, a proof challenge consumed,
a code verified), then asks :func:`require`; nothing else decides who may change what.
``docs/SECURITY.md`` shows the same table: ``python -m mfa_service.service.policy``
prints it, and tests/unit/test_policy.py fails when the two differ.

Evidence, weakest first (the words of docs/SECURITY.md):

- **password step**: the caller vouches that the user passed the password (this service
  holds none). Once the user has an ACTIVE factor it proves nothing here.
- **remembered browser's session**: a live 2FA session that RecognizeDevice opened on a
  remembered browser, without a code (service/devices.py). It says the browser passed 2FA
  once, up to MFA_TRUSTED_DEVICE_DAYS ago, never that the user is at it now: weaker than
  a session from a code (which implies it), never fresh, and no row below accepts it.
- **session**: a live 2FA session token of the same user, opened by a code or a passkey;
  **fresh** when it passed 2FA at most 10 minutes ago.
- **proof with X**: an APPROVED challenge on factor X, for the purpose at hand, in this
  flow (consumed once).
- **recovery code**: an unused code of the user's current set.
- **remembered browser's token**: a live device token of the user, on the application
  it was remembered on (only what opens a session without a code).
- **established**: the user's first factor and the recovery codes issued with it, at
  once (no one else's factor existed to protect); a factor added later, or codes
  regenerated later, once they have been ACTIVE or issued for ``MFA_NEW_CREDENTIAL_HOLD``
  (24 h). Before that they are **new**: a stolen fresh session may add a factor (that is
  what step-up means, and every channel is told), but nothing new may remove or replace
  what the user had until the user has had a day of notices to react.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.errors import FailedPrecondition


class Evidence(StrEnum):
    """What a caller can present for a change, once checked. Stronger forms imply the
    weaker ones (``implied``): a fresh session is a session, an established factor's
    proof is a proof with an ACTIVE factor."""

    PASSWORD_STEP = "password step"  # noqa: S105 - a name, not a password
    TRUSTED_DEVICE_SESSION = "a remembered browser's session"
    SESSION = "session"
    FRESH_SESSION = "fresh session"
    ENROLLING_SESSION = "the session that enrolled it, still live"
    PROOF_WITH_TARGET = "proof with that factor"
    PROOF_WITH_ACTIVE = "proof with an ACTIVE factor"
    PROOF_WITH_ESTABLISHED = "proof with an established ACTIVE factor"
    PROOF_WITH_NEW = "proof with a new factor"
    PROOF_WITH_OLD_PHONE = "proof with the old phone"
    RECOVERY_CODE = "recovery code"
    ESTABLISHED_RECOVERY_CODE = "established recovery code"
    NEW_RECOVERY_CODE = "new recovery code"
    SESSION_TOKEN = "the session's token"  # noqa: S105 - a name, not a token
    DEVICE_TOKEN = "a remembered browser's token"  # noqa: S105 - a name, not a token
    CALLER = "a caller of either application"


# What each stronger kind of evidence is as well (implied() follows these to the end).
_IMPLIES: dict[Evidence, frozenset[Evidence]] = {
    Evidence.FRESH_SESSION: frozenset({Evidence.SESSION}),
    # A session from a code vouches for at least what a remembered browser's does; never
    # the other way round.
    Evidence.SESSION: frozenset({Evidence.TRUSTED_DEVICE_SESSION}),
    Evidence.PROOF_WITH_ESTABLISHED: frozenset({Evidence.PROOF_WITH_ACTIVE}),
    Evidence.PROOF_WITH_NEW: frozenset({Evidence.PROOF_WITH_ACTIVE}),
    Evidence.ESTABLISHED_RECOVERY_CODE: frozenset({Evidence.RECOVERY_CODE}),
    Evidence.NEW_RECOVERY_CODE: frozenset({Evidence.RECOVERY_CODE}),
}

# Evidence missing while its weaker form was presented: "too new" or "too old", a more
# useful refusal than "missing".
_WEAKER_FORM: dict[Evidence, Evidence] = {
    Evidence.FRESH_SESSION: Evidence.SESSION,
    Evidence.PROOF_WITH_ESTABLISHED: Evidence.PROOF_WITH_NEW,
    Evidence.ESTABLISHED_RECOVERY_CODE: Evidence.NEW_RECOVERY_CODE,
}


def implied(presented: Iterable[Evidence]) -> frozenset[Evidence]:
    """``presented`` with everything it implies, however indirectly."""
    out = set(presented)
    todo = list(out)
    while todo:
        for weaker in _IMPLIES.get(todo.pop(), frozenset()):
            if weaker not in out:
                out.add(weaker)
                todo.append(weaker)
    return frozenset(out)


class Change(StrEnum):
    """Every change the service makes on a caller's word (rows of the table)."""

    ADD_FIRST_FACTOR = "add the first factor (no ACTIVE factor)"
    ADD_FACTOR = "add another factor (Enroll)"
    RENEW_FIRST_PENDING = "a new code or WebAuthn options for a PENDING first factor"
    RENEW_PENDING = "a new code or WebAuthn options for a PENDING factor (Challenge)"
    CONFIRM_FIRST_PENDING = "confirm a PENDING first factor (enrolled with no ACTIVE factor)"
    CONFIRM_PENDING = "confirm a PENDING factor (enrolled with a session)"
    LOG_IN = "log in (Verify, LOGIN)"
    DISABLE_FACTOR = "disable factor X (Disable)"
    CHANGE_PHONE = "change the phone (Enroll, PHONE)"
    REGENERATE_RECOVERY_CODES = "regenerate recovery codes"
    END_SESSION = "end one session (logout)"
    END_ALL_SESSIONS = "end all of a user's sessions (log out everywhere)"
    REMEMBER_DEVICE = "remember a browser (Verify, LOGIN, remember_device)"
    LOG_IN_REMEMBERED = "log in on a remembered browser (RecognizeDevice)"
    FORGET_DEVICE = "forget a remembered browser (ForgetDevice)"


@dataclass(frozen=True)
class Rule:
    """One row: ``needs`` is a list of alternatives, each a set that must be presented
    whole; ``never_enough`` names weaker evidence that is refused on purpose (a test
    plays each); ``doing`` words the change in refusals; ``why`` is for the docs."""

    change: Change
    needs: tuple[frozenset[Evidence], ...]
    never_enough: tuple[Evidence, ...]
    doing: str
    why: str


def _any(*alternatives: Iterable[Evidence]) -> tuple[frozenset[Evidence], ...]:
    return tuple(frozenset(a) for a in alternatives)


E = Evidence
TABLE: dict[Change, Rule] = {r.change: r for r in (
    Rule(Change.ADD_FIRST_FACTOR, _any([E.PASSWORD_STEP]), (),
         "adding the first factor",
         "no factor exists to ask; the pending factor is confirmed with a code from it"),
    Rule(Change.ADD_FACTOR, _any([E.FRESH_SESSION]),
         (E.PASSWORD_STEP, E.TRUSTED_DEVICE_SESSION, E.SESSION),
         "adding a factor",
         "a password alone must not add an app that then walks around every rule below"),
    Rule(Change.RENEW_FIRST_PENDING, _any([E.PASSWORD_STEP]), (),
         "a new code for this pending factor",
         "what Enroll needed for it"),
    Rule(Change.RENEW_PENDING, _any([E.FRESH_SESSION]),
         (E.PASSWORD_STEP, E.TRUSTED_DEVICE_SESSION, E.SESSION),
         "a new code or new options for this pending factor",
         "what Enroll needed: otherwise a password alone finishes a pending factor with "
         "the attacker's own authenticator"),
    Rule(Change.CONFIRM_FIRST_PENDING, _any([E.PROOF_WITH_TARGET]), (),
         "confirming this factor",
         "within MFA_PENDING_TTL of Enroll (then the factor is gone)"),
    Rule(Change.CONFIRM_PENDING, _any([E.PROOF_WITH_TARGET, E.ENROLLING_SESSION]),
         (E.PROOF_WITH_TARGET,),
         "confirming this factor",
         "within MFA_PENDING_TTL of Enroll, and only while the session that enrolled it "
         "lives (a logout ends what it started)"),
    Rule(Change.LOG_IN, _any([E.PROOF_WITH_ACTIVE], [E.RECOVERY_CODE]),
         (E.PASSWORD_STEP,),
         "logging in", "the second factor itself"),
    Rule(Change.DISABLE_FACTOR, _any([E.PROOF_WITH_TARGET], [E.ESTABLISHED_RECOVERY_CODE]),
         (E.FRESH_SESSION, E.PROOF_WITH_ESTABLISHED, E.PROOF_WITH_NEW, E.NEW_RECOVERY_CODE),
         "disabling a factor",
         "disabling needs the enabled method; nothing new removes what the user had"),
    Rule(Change.CHANGE_PHONE, _any([E.PROOF_WITH_OLD_PHONE, E.FRESH_SESSION]),
         (E.FRESH_SESSION, E.PROOF_WITH_OLD_PHONE, E.TRUSTED_DEVICE_SESSION),
         "changing the phone", "the old number consents, and the user stepped up"),
    Rule(Change.REGENERATE_RECOVERY_CODES, _any([E.PROOF_WITH_ESTABLISHED]),
         (E.FRESH_SESSION, E.PROOF_WITH_NEW, E.ESTABLISHED_RECOVERY_CODE),
         "regenerating recovery codes",
         "a stolen session must not mint codes that then remove the user's factors"),
    Rule(Change.END_SESSION, _any([E.SESSION_TOKEN]), (),
         "ending a session", "logout"),
    Rule(Change.END_ALL_SESSIONS, _any([E.CALLER]), (),
         "ending every session of a user",
         "one login, both applications: log out everywhere ends both; it forgets the "
         "user's remembered browsers too"),
    Rule(Change.REMEMBER_DEVICE, _any([E.PROOF_WITH_ACTIVE]),
         (E.RECOVERY_CODE, E.TRUSTED_DEVICE_SESSION, E.PASSWORD_STEP),
         "remembering this browser",
         "a code from a real factor, typed on this browser now; a recovery code gets a "
         "user in when a factor is lost, it must not also spare that browser every code "
         "for a month"),
    Rule(Change.LOG_IN_REMEMBERED, _any([E.DEVICE_TOKEN]), (E.PASSWORD_STEP,),
         "logging in without a code",
         "the browser passed 2FA with a real factor within MFA_TRUSTED_DEVICE_DAYS, was "
         "used within MFA_TRUSTED_DEVICE_IDLE_DAYS, and no factor changed since; its "
         "session is never fresh and proves nothing in any other row"),
    Rule(Change.FORGET_DEVICE, _any([E.CALLER]), (),
         "forgetting a remembered browser",
         "it only takes trust away, as log out everywhere does; its sessions end with it"),
)}


def _refusal(rule: Rule, missing: Evidence, presented: frozenset[Evidence],
             until: datetime | None) -> FailedPrecondition:
    doing = rule.doing
    if missing is E.FRESH_SESSION:
        return FailedPrecondition(
            f"{doing} needs session_token: a 2FA session of this user from the last "
            "10 minutes; pass 2FA again",
            reason=ErrorReason.ERROR_REASON_RECENT_SESSION_REQUIRED)
    if missing is E.ENROLLING_SESSION:
        return FailedPrecondition(
            f"{doing} needs the 2FA session that started the enrolment, and it has "
            "ended; enrol again",
            reason=ErrorReason.ERROR_REASON_ENROLLING_SESSION_ENDED)
    if missing is E.PROOF_WITH_OLD_PHONE:
        return FailedPrecondition(
            "a phone is already active: verify a PURPOSE_CHANGE_PHONE challenge on it and "
            "pass its id as change_proof_challenge_id (approved in the last 10 minutes, "
            "not used before)",
            reason=ErrorReason.ERROR_REASON_PHONE_CHANGE_PROOF_REQUIRED)
    if _WEAKER_FORM.get(missing) in presented:
        what = "recovery codes" if missing is E.ESTABLISHED_RECOVERY_CODE else "factor"
        metadata = {"establishedAt": until.isoformat()} if until is not None else None
        return FailedPrecondition(
            f"{doing} needs an established {what}: these were added in the last day and "
            "cannot yet remove or replace what the user had",
            reason=ErrorReason.ERROR_REASON_CREDENTIAL_TOO_NEW, metadata=metadata)
    if missing is E.PROOF_WITH_ESTABLISHED:
        return FailedPrecondition(
            f"{doing} needs proof_challenge_id: an approved "
            "PURPOSE_REGENERATE_RECOVERY_CODES challenge of this user, from the last "
            "10 minutes, not used before",
            reason=ErrorReason.ERROR_REASON_PROOF_REQUIRED)
    if missing is E.PROOF_WITH_TARGET:
        return FailedPrecondition(f"{doing} needs a challenge opened on that factor",
                                  reason=ErrorReason.ERROR_REASON_CHALLENGE_MISMATCH)
    if rule.change is Change.REMEMBER_DEVICE:
        return FailedPrecondition(
            f"{doing} needs a code from an authenticator app, email, phone or passkey on "
            "a PURPOSE_LOGIN challenge, not a recovery code",
            reason=ErrorReason.ERROR_REASON_REMEMBER_DEVICE_NOT_ALLOWED)
    return FailedPrecondition(f"{doing} needs {missing.value}",
                              reason=ErrorReason.ERROR_REASON_FACTOR_STATUS_FORBIDS)


def allows(change: Change, presented: Iterable[Evidence]) -> bool:
    have = implied(presented)
    return any(alt <= have for alt in TABLE[change].needs)


def require(change: Change, presented: Iterable[Evidence], *,
            established_at: datetime | None = None) -> None:
    """Refuse ``change`` unless ``presented`` (checked evidence) satisfies its row.

    The refusal names what is missing: preferably a need whose weaker form was presented
    (a stale session, a new factor or new codes: "too new" with ``established_at`` as
    metadata), else the first missing need of the closest alternative.
    """
    rule = TABLE[change]
    have = implied(presented)
    if any(alt <= have for alt in rule.needs):
        return
    missing_per_alt = [sorted(alt - have, key=list(Evidence).index) for alt in rule.needs]
    for missing in missing_per_alt:
        for m in missing:
            weaker = _WEAKER_FORM.get(m)
            if weaker is not None and weaker in have:
                raise _refusal(rule, m, have, established_at)
    closest = min(missing_per_alt, key=len)
    raise _refusal(rule, closest[0], have, established_at)


def markdown_table() -> str:
    """The table as docs/SECURITY.md shows it (tests/unit/test_policy.py compares them)."""
    lines = ["| change | needs | never enough | why |", "| --- | --- | --- | --- |"]
    for rule in TABLE.values():
        needs = " **or** ".join(" + ".join(sorted(e.value for e in alt))
                                for alt in rule.needs)
        never = "; ".join(e.value for e in rule.never_enough)
        lines.append(f"| {rule.change.value} | {needs} | {never} | {rule.why} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a docs helper
    print(markdown_table())
