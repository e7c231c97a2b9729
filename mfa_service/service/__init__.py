"""The service layer: the rules, one module per use case, each taking what it uses.

enrolment.py (Enroll), challenges.py (Challenge), verification.py (Verify), disabling.py
(Disable), recovery.py (RegenerateRecoveryCodes), profile.py (ListFactors,
ListAuditEvents), sessions.py (CheckSession, RevokeSession). Their shared parts: rules.py
(the limits and pure checks), policy.py (the proof model), lockout.py, limits.py (the
send quota), attempts.py (the steps of a verification), notices.py, audit.py. Each call
is one transaction that first takes the user's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.domain import Method
from mfa_service.factors.registry import FactorRegistry
from mfa_service.service.assurance import Assurance
from mfa_service.service.attempts import Steps
from mfa_service.service.challenges import ChallengeOpener, Challenges
from mfa_service.service.devices import DeviceRules, TrustedDevices
from mfa_service.service.disabling import Disabling, Removal
from mfa_service.service.enrolment import Enrolment
from mfa_service.service.limits import SendLimits
from mfa_service.service.lockout import Lockout, LockoutPolicy
from mfa_service.service.notices import Notifier
from mfa_service.service.optimism import Hints
from mfa_service.service.profile import Profile
from mfa_service.service.recovery import Recovery
from mfa_service.service.rules import Rules, new_id
from mfa_service.service.sessions import SessionService
from mfa_service.service.verification import Verification
from mfa_service.store.database import Database


@dataclass(frozen=True)
class Services:
    """Every use case, as the transport layer calls them."""

    enrolment: Enrolment
    challenges: Challenges
    verification: Verification
    disabling: Disabling
    recovery: Recovery
    profile: Profile
    sessions: SessionService
    devices: TrustedDevices
    assurance: Assurance

    @classmethod
    def build(cls, *, db: Database, clock: Clock, keyring: Keyring, registry: FactorRegistry,
              sessions: SessionService, notifier: Notifier, rules: Rules,
              devices: DeviceRules | None = None, assurance: Assurance | None = None,
              lockout_policy: LockoutPolicy | None = None,
              new_id: Callable[[], str] = new_id) -> Services:
        """Wire the use cases: each gets exactly the collaborators it uses."""
        lockout = Lockout(notifier, lockout_policy or LockoutPolicy())
        sends = SendLimits(rules.quota, keyring, db, clock)
        hints = Hints()  # which calls may try without the user's lock (optimism.py)
        opener = ChallengeOpener(keyring, rules, new_id, hints)
        recovery = Recovery(db, clock, keyring, rules, notifier, sessions, new_id)
        trusted = TrustedDevices(db, clock, keyring, sessions, lockout,
                                 devices or DeviceRules())
        # What follows a passed proof, per method: a used recovery code is told.
        steps = Steps(registry, rules, lockout, {Method.RECOVERY_CODE: recovery.code_used})
        removal = Removal(sessions, notifier, recovery)
        return cls(
            enrolment=Enrolment(db, clock, registry, rules, lockout, sends, opener, sessions,
                                new_id),
            challenges=Challenges(db, clock, registry, rules, lockout, sends, opener,
                                  sessions),
            verification=Verification(db, clock, rules, steps, sessions, notifier, recovery,
                                      removal, trusted, hints),
            disabling=Disabling(db, clock, rules, steps, removal),
            recovery=recovery, profile=Profile(db, clock, rules), sessions=sessions,
            devices=trusted, assurance=assurance or Assurance())
