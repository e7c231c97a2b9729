"""The service layer: the rules, one module per use case (see context.py)."""

from __future__ import annotations

from dataclasses import dataclass

from mfa_service.service.assurance import Assurance
from mfa_service.service.challenges import Challenges
from mfa_service.service.context import Context
from mfa_service.service.devices import DeviceRules, TrustedDevices
from mfa_service.service.enrolment import Enrolment
from mfa_service.service.profile import Profile
from mfa_service.service.recovery import Recovery
from mfa_service.service.sessions import SessionService
from mfa_service.service.verification import Verification


@dataclass(frozen=True)
class Services:
    """Every use case, as the transport layer calls them."""

    enrolment: Enrolment
    challenges: Challenges
    verification: Verification
    recovery: Recovery
    profile: Profile
    sessions: SessionService
    devices: TrustedDevices
    assurance: Assurance

    @classmethod
    def build(cls, ctx: Context, *, devices: DeviceRules | None = None,
              assurance: Assurance | None = None) -> Services:
        recovery = Recovery(ctx)
        trusted = TrustedDevices(ctx, devices or DeviceRules())
        return cls(enrolment=Enrolment(ctx), challenges=Challenges(ctx),
                   verification=Verification(ctx, recovery, trusted), recovery=recovery,
                   profile=Profile(ctx), sessions=ctx.sessions, devices=trusted,
                   assurance=assurance or Assurance())
