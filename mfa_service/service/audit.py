"""Writing the audit trail, inside the transaction of the change it records."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from mfa_service.domain import Application, AuditContext, AuditEventType, AuditOutcome
from mfa_service.store.database import Transaction

# The kinds live in the domain (the store reads them back as such); named here for the
# use cases that write them.
Event = AuditEventType
Outcome = AuditOutcome


class Reason(StrEnum):
    """Why the service itself disabled a factor (detail "reason" of factor_disabled)."""

    SUPERSEDED_BY_FIRST = "superseded by the first factor"
    LAST_FACTOR_DISABLED = "last factor disabled"


def record(tx: Transaction, now: datetime, event: Event, outcome: Outcome, who: AuditContext,
           *, user_id: str | None = None, factor_id: str | None = None,
           challenge_id: str | None = None, session_id: str | None = None,
           application: Application | None = None,
           detail: dict[str, str | int] | None = None) -> None:
    """Append one event (written with the transaction's other deferred writes, before
    COMMIT). ``detail`` holds non-secret facts only (a result, a purpose)."""
    tx.later.audit.record(**event_row(
        now, event, outcome, who, user_id=user_id, factor_id=factor_id,
        challenge_id=challenge_id, session_id=session_id, application=application,
        detail=detail))
    # Metrics count committed events by their enum facts (event, result, method,
    # application, scope), never by the ids above.
    tx.note_event(event.value, outcome.value, detail,
                  application.value if application else None)


def event_row(now: datetime, event: Event, outcome: Outcome, who: AuditContext, *,
              user_id: str | None = None, factor_id: str | None = None,
              challenge_id: str | None = None, session_id: str | None = None,
              application: Application | None = None,
              detail: dict[str, str | int] | None = None) -> dict[str, Any]:
    """The audit row of one event, as ``record`` writes it; bulk work (the importer's
    thousands of rows a batch, store/bulk.py) writes these itself."""
    return {
        "occurred_at": now, "event": event.value, "outcome": outcome.value,
        "user_id": user_id, "factor_id": factor_id, "challenge_id": challenge_id,
        "session_id": session_id, "caller": who.caller,
        "application": application.value if application else None,
        "client_ip": who.client_ip or None, "user_agent": who.user_agent or None,
        "detail": json.dumps(detail, sort_keys=True) if detail else None}
