"""The send limits: codes per factor, user and destination, and the caps across users on
phone codes (SendQuota, decided in the transaction that sends), and the record of a phone
code refused by one of those caps (SendLimits). The per-user lockout is service/lockout.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from mfa.v1.error_reason_pb2 import ErrorReason

from mfa_service.clock import Clock
from mfa_service.crypto import Keyring
from mfa_service.domain import Application, AuditContext, Method
from mfa_service.errors import MfaError, ResourceExhausted
from mfa_service.factors.codes import destination_key, lock_key_of, phone_prefix_message
from mfa_service.factors.phone_code import phone_area
from mfa_service.service import audit
from mfa_service.store.database import Database, Transaction

log = logging.getLogger("mfa_service.limits")


@dataclass(frozen=True)
class SendPermit:
    """What the quota decided a send is counted under (stored on the challenge)."""

    destination_key: bytes
    phone_prefix_key: bytes | None = None  # HMAC (primary key) of the number's range
    phone_region: str | None = None


class PhoneSendRefused(ResourceExhausted):
    """A phone code refused by a cap across users (range, country, daily budget): the
    marks of SMS pumping and toll fraud, so each one is audited, counted in a metric and
    logged (SendLimits.record_refusal), unlike a user's own resend limits."""

    def __init__(self, message: str, *, retry_after_seconds: float,
                 reason: ErrorReason.ValueType, limit: str, region: str) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, reason=reason)
        self.limit = limit  # "phone_prefix" | "phone_country" | "phone_daily_budget"
        self.region = region  # not secret: a country, never the number


@dataclass(frozen=True)
class SendQuota:
    """The send limits (docs/API.md), decided in the transaction that will send.

    - cooldown: after a code that is still waiting to be used (an OPEN challenge), on the
      factor, or for Enroll on the user's factors of the method (a re-enrolment is a
      resend). The cooldown is against resends: after an approval the next code goes at
      once.
    - per user and method: at most N codes per window, so re-enrolling a new address
      cannot be used to send without limit.
    - per destination: at most N codes per window to one address or number, whichever
      users asked (SMS pumping, toll fraud, flooding one inbox).
    - phone codes, per number range (the number less its last 4 digits) and per country,
      at most N an hour whichever users asked: SMS pumping spreads over the numbers of a
      range an attacker rents, toll fraud over a country's expensive numbers, each number
      staying under the per-destination limit (Twilio, "SMS pumping fraud"; OWASP
      Authentication Cheat Sheet, SMS abuse).
    - phone codes, a daily budget for the whole service (UTC day): the ceiling on what a
      pumping run we did not recognise can cost; then only phone codes stop, the other
      methods still work.

    The caller holds the per-user lock; the destination count is taken under a lock of its
    own (two users, one number), and a phone number's range and country counts under
    theirs (taken in the same statement, always in the order destination, range,
    country), so parallel requests cannot all see "4 sent" and all send (OWASP, Twilio
    Verify). The budget is one conditional UPDATE of the day's row, taken last, only once
    every other limit passed (its row lock then serialises phone sends only for the end
    of their transactions).
    """

    cooldown: timedelta = timedelta(seconds=30)
    window: timedelta = timedelta(minutes=10)
    per_user_method: int = 10
    per_destination: int = 5
    area_window: timedelta = timedelta(hours=1)
    per_phone_prefix: int = 30
    per_phone_country: int = 1000
    phone_daily_budget: int = 10_000

    async def check(self, tx: Transaction, now: datetime, *, user_id: str, method: Method,
                    factor_id: str | None, destination: str,
                    keyring: Keyring) -> SendPermit:
        """Raise ResourceExhausted (with the wait) or return what the send counts under."""
        key = destination_key(destination)
        prefix_keys: list[bytes] = []
        region = None
        if method is Method.PHONE:
            prefix, region = phone_area(destination)
            prefix_keys = keyring.mac_all(phone_prefix_message(prefix))
            await tx.challenges.lock_destination(
                key, lock_key_of("phone-prefix", prefix), lock_key_of("phone-region", region))
        else:
            await tx.challenges.lock_destination(key)
        counts = await tx.challenges.send_counts(
            now, cooldown_since=now - self.cooldown, window_since=now - self.window,
            user_id=user_id, method=method, factor_id=factor_id, destination_key=key,
            area_since=now - self.area_window, prefix_keys=prefix_keys, region=region)
        if self.cooldown.total_seconds() > 0 and counts.latest_open is not None:
            raise ResourceExhausted(
                "a code was sent moments ago; wait before asking for a new one",
                retry_after_seconds=(counts.latest_open + self.cooldown - now).total_seconds(),
                reason=ErrorReason.ERROR_REASON_RESEND_COOLDOWN)
        if counts.user_method >= self.per_user_method and counts.user_method_earliest:
            raise ResourceExhausted(
                "too many codes were sent; wait before asking for a new one",
                retry_after_seconds=(counts.user_method_earliest + self.window
                                     - now).total_seconds(),
                reason=ErrorReason.ERROR_REASON_SEND_RATE_LIMITED)
        if counts.destination >= self.per_destination and counts.destination_earliest:
            raise ResourceExhausted(
                "too many codes were sent to this destination; wait before asking for a "
                "new one",
                retry_after_seconds=(counts.destination_earliest + self.window
                                     - now).total_seconds(),
                reason=ErrorReason.ERROR_REASON_DESTINATION_RATE_LIMITED)
        if region is None:
            return SendPermit(key)
        for count, earliest, cap, limit, what in (
                (counts.prefix, counts.prefix_earliest, self.per_phone_prefix, "phone_prefix",
                 "numbers of this range"),
                (counts.region, counts.region_earliest, self.per_phone_country,
                 "phone_country", "this country")):
            if count >= cap and earliest is not None:
                raise PhoneSendRefused(
                    f"too many codes were sent to {what}; wait before asking for a new one",
                    retry_after_seconds=(earliest + self.area_window - now).total_seconds(),
                    reason=ErrorReason.ERROR_REASON_PHONE_AREA_RATE_LIMITED,
                    limit=limit, region=region)
        day = now.astimezone(UTC).date()
        if not await tx.challenges.spend_phone_budget(day, self.phone_daily_budget):
            next_day = datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)
            raise PhoneSendRefused(
                "the service's daily budget of text messages and voice calls is spent; "
                "use another method or wait for the next day's budget",
                retry_after_seconds=(next_day - now).total_seconds(),
                reason=ErrorReason.ERROR_REASON_PHONE_BUDGET_EXHAUSTED,
                limit="phone_daily_budget", region=region)
        return SendPermit(key, prefix_keys[0], region)


@dataclass(frozen=True)
class SendLimits:
    """The send quota with what it needs: the keyring (a number range is counted under
    its keyed hash) and, to record a refusal, the database and the clock."""

    quota: SendQuota
    keyring: Keyring
    db: Database
    clock: Clock

    async def check(self, tx: Transaction, now: datetime, *, user_id: str, method: Method,
                    factor_id: str | None, destination: str) -> SendPermit:
        """The send quota for a code about to go to ``destination``."""
        return await self.quota.check(tx, now, user_id=user_id, method=method,
                                      factor_id=factor_id, destination=destination,
                                      keyring=self.keyring)

    async def record_refusal(self, refusal: PhoneSendRefused, who: AuditContext, *,
                             user_id: str, factor_id: str | None,
                             application: Application) -> None:
        """Audit (and so count in the metrics) and log a phone code refused by a cap
        across users, in a transaction of its own: the refused one rolled back, and
        nothing else changed. A failure here never hides the refusal itself."""
        now = self.clock.now()
        detail: dict[str, str | int] = {"limit": refusal.limit, "method": Method.PHONE.value,
                                        "region": refusal.region}
        try:
            async with self.db.transaction() as tx:
                audit.record(tx, now, audit.Event.SEND_REFUSED, audit.Outcome.REFUSED, who,
                             user_id=user_id, factor_id=factor_id, application=application,
                             detail=detail)
        except MfaError:
            log.warning("send refusal not audited", exc_info=True)
        # No number, no user id: the limit and the country are what an operator acts on.
        log.warning("phone code refused: %s", refusal.limit, extra={
            "limit": refusal.limit, "region": refusal.region,
            "retry_after_seconds": int(refusal.retry_after_seconds)})
