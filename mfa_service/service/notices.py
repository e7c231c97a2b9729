"""Security notices: telling the user, out of band, that their second factor changed.

Notices go through the same durable outbox as codes. They carry no code, so they are
sent even to a factor that was just replaced (the old phone learns it was replaced: a
user who did not ask for that can react).

Telling the user is the one step every change to a user's factors takes (a factor added
or confirmed, disabled, a phone changed, recovery codes regenerated or used: docs/
SECURITY.md), so it is also where those changes forget the user's remembered browsers
(``on_factor_change``, service/devices.py): a path that changes a factor cannot tell the
user without forgetting them, and a new path cannot forget to.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import enqueue
from mfa_service.delivery.templates import notice_message
from mfa_service.domain import (
    AuditContext,
    Channel,
    FactorRecord,
    FactorStatus,
    MessageKind,
    Method,
    NoticeKind,
    Outgoing,
)
from mfa_service.store.database import Transaction

# The notices that tell of a change to the user's factors; a lockout changes none.
FACTOR_CHANGES = frozenset(NoticeKind) - {NoticeKind.ACCOUNT_LOCKED}


class FactorChangeHook(Protocol):
    """What a change to ``user_id``'s factors also does, in its transaction."""

    async def __call__(self, tx: Transaction, now: datetime, user_id: str,
                       who: AuditContext) -> None: ...


async def nothing_else(tx: Transaction, now: datetime, user_id: str,
                       who: AuditContext) -> None:
    """A FactorChangeHook for a caller that does what a change implies itself (the
    operator's reset forgets the user's browsers in its own statements)."""


class Notifier:
    def __init__(self, keyring: Keyring, product: str, ttl: timedelta,
                 locale: str = "en", *, on_factor_change: FactorChangeHook) -> None:
        self._keyring = keyring
        self._product = product
        self._ttl = ttl
        self._locale = locale  # for the account's own address (no factor says better)
        self._on_factor_change = on_factor_change

    async def notify(self, tx: Transaction, now: datetime, user_id: str, kind: NoticeKind, *,
                     who: AuditContext, also: FactorRecord | None = None,
                     masked_detail: str = "", skip: str | None = None,
                     account_email: str | None = None) -> int:
        """Queue ``kind`` to every ACTIVE factor of the user that can receive a message
        (email and phone) and to ``also``; returns how many were queued.

        Every one, not only the email: a user whose only factor is a phone must learn
        that an app was added or recovery codes were regenerated, or an attacker's
        change goes unnoticed until it is too late.
        ``skip``: a factor that needs no notice (the one just confirmed by its own code).
        ``account_email``: the account's own address, when the caller passed it, so a
        user whose factors are only an app or a passkey hears of the change too (sent in
        the default language, once, unless an email factor already has that address).
        ``who``: the caller, for the audit of what the change also ends.
        """
        records = await tx.factors.list_for_user(user_id)
        if kind in FACTOR_CHANGES and any(
                r.factor.status is FactorStatus.ACTIVE and r.factor.factor_id != skip
                for r in records):
            # Only the confirmation of the user's first factor leaves no other ACTIVE
            # factor; no browser can be remembered before one (a login needs it, and
            # losing the last one forgot them all), so there is nothing to forget and
            # that confirmation keeps its statement budget (tests/api/test_statements.py).
            await self._on_factor_change(tx, now, user_id, who)
        targets = [t for t in records
                   if t.factor.status is FactorStatus.ACTIVE
                   and t.factor.method in (Method.EMAIL, Method.PHONE)
                   and t.factor.factor_id != skip]
        if also is not None and also.destination and all(
                t.factor.factor_id != also.factor.factor_id for t in targets):
            targets.append(also)
        sends: list[tuple[Channel, str, str, str | None]] = [
            (Channel.EMAIL if t.factor.method is Method.EMAIL else Channel.SMS,
             t.destination or "", t.locale, t.factor.factor_id) for t in targets]
        if account_email and all(
                not (c is Channel.EMAIL and d.lower() == account_email.lower())
                for c, d, _, _ in sends):
            sends.append((Channel.EMAIL, account_email, self._locale, None))
        for channel, destination, locale, factor_id in sends:
            subject, text = notice_message(channel, kind=kind, product=self._product,
                                           locale=locale, masked_detail=masked_detail)
            assert destination
            enqueue(tx, self._keyring, Outgoing(
                kind=MessageKind.NOTICE, channel=channel, destination=destination,
                user_id=user_id, subject=subject, text=text, not_after=now + self._ttl,
                factor_id=factor_id), now)
        return len(sends)
