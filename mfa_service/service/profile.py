"""Reads for the profile page and the audit trail: ListFactors, ListAuditEvents."""

from __future__ import annotations

from datetime import datetime

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.domain import AuditContext, AuditEvent, Factor, FactorStatus, Method
from mfa_service.errors import PermissionDenied
from mfa_service.service.rules import Rules
from mfa_service.store.database import Database


class Profile:
    def __init__(self, db: Database, clock: Clock, rules: Rules) -> None:
        self._db = db
        self._clock = clock
        self._rules = rules

    async def list_factors(self, user_id: str, who: AuditContext) -> tuple[list[Factor], int]:
        """Every factor of the user, and how many recovery codes remain. A PENDING factor
        past MFA_PENDING_TTL is gone and not listed (nothing offers to resume it)."""
        who.authorize_any()  # a caller with no application (an audit reader) sees nothing
        now = self._clock.now()
        async with self._db.transaction(readonly=True) as tx:
            records, codes_left = await tx.factors.list_with_codes_left(user_id)
        has_codes = any(r.factor.method is Method.RECOVERY_CODE
                        and r.factor.status is FactorStatus.ACTIVE for r in records)
        return ([r.factor for r in records if not self._rules.gone(r.factor, now)],
                codes_left if has_codes else 0)

    async def list_audit_events(self, user_id: str, who: AuditContext, *,
                                start: datetime | None, end: datetime | None,
                                before_id: int | None, limit: int) -> list[AuditEvent]:
        if not who.audit_reader:
            raise PermissionDenied("this caller may not read the audit trail",
                                   reason=ErrorReason.ERROR_REASON_CALLER_NOT_ALLOWED)
        async with self._db.transaction(readonly=True) as tx:
            return await tx.audit.page(user_id, start=start, end=end, before_id=before_id,
                                       limit=limit)
