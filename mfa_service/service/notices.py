"""Security notices: telling the user, out of band, that their second factor changed.

Notices go through the same durable outbox as codes. They carry no code, so they are
sent even to a factor that was just replaced (the old phone learns it was replaced: a
user who did not ask for that can react).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import enqueue
from mfa_service.delivery.templates import notice_message
from mfa_service.domain import Channel, FactorRecord, MessageKind, Method, NoticeKind, Outgoing
from mfa_service.store.database import Transaction


class Notifier:
    def __init__(self, keyring: Keyring, product: str, ttl: timedelta,
                 locale: str = "en") -> None:
        self._keyring = keyring
        self._product = product
        self._ttl = ttl
        self._locale = locale  # for the account's own address (no factor says better)

    async def notify(self, tx: Transaction, now: datetime, user_id: str, kind: NoticeKind, *,
                     also: FactorRecord | None = None, masked_detail: str = "",
                     skip: str | None = None, account_email: str | None = None) -> int:
        """Queue ``kind`` to every ACTIVE factor of the user that can receive a message
        (email and phone) and to ``also``; returns how many were queued.

        Every one, not only the email: a user whose only factor is a phone must learn
        that an app was added or recovery codes were regenerated, or an attacker's
        change goes unnoticed until it is too late.
        ``skip``: a factor that needs no notice (the one just confirmed by its own code).
        ``account_email``: the account's own address, when the caller passed it, so a
        user whose factors are only an app or a passkey hears of the change too (sent in
        the default language, once, unless an email factor already has that address).
        """
        targets = [t for t in await tx.factors.active_reachable(user_id)
                   if t.factor.factor_id != skip]
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
