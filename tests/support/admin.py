"""Rows as a server leaves them, written straight into a database, for the tests of the
operator commands (keys rotate/status, admin reset-user, audit): factors, sessions and
outbox messages under given keys, and the keyrings they rotate between."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from mfa_service.crypto import Keyring
from mfa_service.delivery.outbox import enqueue
from mfa_service.domain import (
    Channel,
    Factor,
    FactorRecord,
    FactorStatus,
    MessageKind,
    Method,
    Outgoing,
)
from mfa_service.factors.totp import secret_aad
from mfa_service.store.database import Database
from mfa_service.store.engine import create_engine
from mfa_service.store.models import (
    factors,
    sessions,
)
from mfa_service.store.unit import Unit

OLD = Keyring.generate_entry("old-1")


NEW = Keyring.generate_entry("new-1")


GONE = Keyring.generate_entry("gone-1")


ROTATED = f"{NEW},{OLD}"  # the new key first (primary), the old one still readable


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(make_url(url)))
    try:
        yield database
    finally:
        await database.dispose()


async def add_factor(db: Database, keyring: Keyring, user_id: str, now: datetime,
                     secret: bytes = b"s" * 20) -> str:
    """An ACTIVE authenticator-app factor whose secret ``keyring`` encrypted."""
    factor_id = str(uuid.uuid4())
    key_id, blob = keyring.encrypt(secret, secret_aad(factor_id, user_id))
    async with db.transaction() as tx:
        tx.later.factors.add(FactorRecord(
            factor=Factor(factor_id=factor_id, user_id=user_id,
                          method=Method.AUTHENTICATOR_APP, status=FactorStatus.ACTIVE,
                          masked_destination=user_id, created_at=now, confirmed_at=now),
            label=user_id, destination=None, secret_ciphertext=blob, secret_key_id=key_id,
            last_totp_step=None))
    return factor_id


async def add_message(db: Database, keyring: Keyring, user_id: str, now: datetime) -> str:
    async with db.transaction() as tx:
        return enqueue(tx, keyring, Outgoing(
            kind=MessageKind.NOTICE, channel=Channel.EMAIL, destination=f"{user_id}@example.com",
            user_id=user_id, subject="Subject", text="a notice",
            not_after=now + timedelta(hours=1)), now)


async def add_live_session(unit: Unit, keyring: Keyring, user_id: str,
                           factor_id: str, now: datetime) -> None:
    key_id, digest = keyring.mac(uuid.uuid4().bytes)
    await unit.execute(insert(sessions).values(
        id=str(uuid.uuid4()), token_hash=digest, token_key_id=key_id, user_id=user_id,
        factor_id=factor_id, method="authenticator_app", application="portal",
        caller="test", authenticated_at=now, expires_at=now + timedelta(hours=1),
        idle_expires_at=now + timedelta(minutes=30)))


async def factor_row(db: Database, factor_id: str) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(select(factors).where(factors.c.id == factor_id))).one()
