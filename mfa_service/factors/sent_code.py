"""What email and phone factors share: a random code, sent, kept only as a keyed hash.

Codes come from ``secrets`` (6-8 digits, NIST SP 800-63B 5.1.3: at least 20 bits with a
rate limit); the hash binds the code to its challenge (factors/codes.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from mfa_service.crypto import Keyring
from mfa_service.domain import Challenge, FactorRecord, Method
from mfa_service.factors.base import CodeMethod, Verdict
from mfa_service.factors.codes import code_matches, generate_numeric_code, normalise_digits

if TYPE_CHECKING:
    from mfa_service.store.database import Transaction


class SentCode:
    """Generation and checking of sent codes, used by the email and phone methods."""

    def __init__(self, keyring: Keyring, length: int,
                 randbelow: Callable[[int], int] = secrets.randbelow) -> None:
        self._keyring = keyring
        self.length = length
        self._randbelow = randbelow

    def parse(self, raw: str) -> str:
        # Accept any length the settings allow, so a code sent before a length change
        # still parses; the hash decides whether it is right.
        return normalise_digits(raw, (6, 7, 8))

    def new(self) -> str:
        return generate_numeric_code(self.length, self._randbelow)

    def matches(self, challenge: Challenge, code: str) -> bool:
        """Constant-time comparison with the challenge's stored HMAC."""
        if challenge.code_hash is None or challenge.code_key_id is None:
            return False
        return code_matches(self._keyring, challenge.challenge_id, code,
                            challenge.code_key_id, challenge.code_hash)


class SentCodeMethod(CodeMethod):
    """Base of the email and phone methods: the code handling they share.

    Subclasses say what a destination is (``begin_enrollment``) and how a code travels
    (``channel_for``).
    """

    method: Method
    sends_code = True
    login_writes_deferred = True

    def __init__(self, codes: SentCode) -> None:
        self._codes = codes

    @property
    def code_length(self) -> int:
        return self._codes.length

    def parse_code(self, raw: str) -> str:
        return self._codes.parse(raw)

    def new_code(self) -> str | None:
        return self._codes.new()

    async def check(self, tx: Transaction, record: FactorRecord, challenge: Challenge,
                    code: str, now: datetime) -> Verdict:
        # Single use is the challenge's own (closed by the attempt that approves it).
        return Verdict.of(self._codes.matches(challenge, code))
