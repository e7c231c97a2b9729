"""Writing the audit trail, inside the transaction of the change it records."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from mfa_service.domain import Application, AuditContext
from mfa_service.store.database import Transaction


class Event(StrEnum):
    ENROLL = "enroll"
    CONFIRM = "factor_confirmed"
    CHALLENGE = "challenge_opened"
    VERIFY = "verify"
    DISABLE = "factor_disabled"
    PHONE_CHANGED = "phone_changed"
    LOCKOUT = "lockout"
    RECOVERY_CODE_USED = "recovery_code_used"
    RECOVERY_CODES_ISSUED = "recovery_codes_issued"
    SESSION_CREATED = "session_created"
    SESSION_REVOKED = "session_revoked"
    ADMIN_RESET = "admin_reset"  # an operator reset a user's second factor (admin-cli)
    KEYS_ROTATED = "keys_rotated"  # stored secrets re-encrypted under the primary key
    # A proof that was refused for a reason the security team should look at: a passkey
    # whose signature counter went backwards (detail "alarm": passkey_counter_regressed)
    # may have been cloned.
    ALARM = "security_alarm"
    # A phone code refused by a cap across users (detail "limit": phone_prefix,
    # phone_country or phone_daily_budget; "region"): SMS pumping / toll fraud signals.
    SEND_REFUSED = "send_refused"
    # A factor brought in ACTIVE from another system by `mfa-service import` (caller
    # import-cli; detail: method, the file's line, the run's id).
    IMPORTED = "factor_imported"


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"  # a limit said no before anything was attempted
    INCOMPLETE = "incomplete"  # an operator's batch job stopped before the end
    NOTHING_TO_RESET = "nothing_to_reset"  # an admin reset found nothing to take away


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
