"""Putting a message into the outbox, inside the caller's transaction.

The body is encrypted (AES-256-GCM, the row id as associated data) because it may carry
a one-time code; the dispatcher decrypts it only to hand it to the provider, then wipes it.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from mfa_service.crypto import Keyring
from mfa_service.domain import Outgoing
from mfa_service.store.database import Transaction


def payload_aad(message_id: str) -> bytes:
    return f"mfa-service/v1/outbox/{message_id}".encode()


def encode_payload(keyring: Keyring, message_id: str, subject: str,
                   text: str) -> tuple[str, bytes]:
    body = json.dumps({"subject": subject, "text": text}).encode()
    return keyring.encrypt(body, payload_aad(message_id))


def decode_payload(keyring: Keyring, message_id: str, key_id: str,
                   blob: bytes) -> tuple[str, str]:
    data = json.loads(keyring.decrypt(key_id, blob, payload_aad(message_id)))
    return str(data["subject"]), str(data["text"])


def enqueue(tx: Transaction, keyring: Keyring, message: Outgoing, now: datetime) -> str:
    """Store ``message`` for delivery when ``tx`` commits (the row is written with the
    transaction's other deferred writes); returns its id."""
    message_id = str(uuid.uuid4())
    key_id, blob = encode_payload(keyring, message_id, message.subject, message.text)
    tx.later.outbox.add(
        message_id=message_id, now=now, kind=message.kind.value, channel=message.channel,
        destination=message.destination, user_id=message.user_id,
        factor_id=message.factor_id, challenge_id=message.challenge_id,
        payload_ciphertext=blob, payload_key_id=key_id, not_after=message.not_after)
    tx.after_commit(tx.wake_outbox)  # the dispatcher looks as soon as it is committed
    return message_id
