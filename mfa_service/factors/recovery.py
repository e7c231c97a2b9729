"""METHOD_RECOVERY_CODE: single-use codes handed out when the first factor became active.

Ten codes of 15 characters from Crockford's base32 alphabet: 75 bits each, shown in
three groups of five. NIST SP 800-63B-4 asks at least 64 bits of a recovery code the
user saves (a look-up secret used to recover the account); the 10-character codes
issued before (50 bits) are still accepted until the user regenerates, so nobody is
locked out by the change. Only HMACs are stored; a code is consumed by a conditional
UPDATE, so it works once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from mfa_service.crypto import Keyring
from mfa_service.domain import Challenge, Channel, FactorRecord, Method
from mfa_service.errors import InvalidArgument
from mfa_service.factors.base import CodeMethod, EnrollInput, EnrollmentMaterial, Verdict

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford: no i, l, o, u
# What people type instead (Crockford's decoding rules).
_CONFUSABLE = str.maketrans({"i": "1", "l": "1", "o": "0"})
CODE_CHARS = 15  # 15 x 5 bits = 75 bits
BITS_PER_SYMBOL = 5  # len(ALPHABET) == 2 ** 5
LEGACY_CODE_CHARS = 10  # issued before: 50 bits, accepted until regenerated
COUNT = 10

if TYPE_CHECKING:
    from mfa_service.store.database import Transaction


def generate_codes(count: int = COUNT,
                   randbits: Callable[[int], int] = secrets.randbits) -> list[str]:
    """``count`` codes formatted "xxxxx-xxxxx-xxxxx", each from 75 random bits, one
    symbol per 5 bits (the alphabet has 32: every symbol equally likely). One call to the
    operating system's generator per code, not one per symbol: a profile of enrolment
    showed the per-symbol calls at 5 % of its CPU."""
    codes = []
    for _ in range(count):
        bits = randbits(BITS_PER_SYMBOL * CODE_CHARS)
        raw = "".join(ALPHABET[(bits >> (BITS_PER_SYMBOL * i)) & 31]
                      for i in range(CODE_CHARS))
        codes.append("-".join(raw[i:i + 5] for i in range(0, CODE_CHARS, 5)))
    return codes


def normalise(raw: str) -> str:
    """Case, spaces, dashes and the usual confusions do not matter; the symbols do."""
    code = raw.strip().lower().replace("-", "").replace(" ", "").translate(_CONFUSABLE)
    if (len(code) not in (CODE_CHARS, LEGACY_CODE_CHARS)
            or any(c not in ALPHABET for c in code)):
        raise InvalidArgument.single("code", "a recovery code is 15 letters and digits, "
                                             "like abcde-12345-fghjk")
    return code


def code_message(user_id: str, code: str) -> bytes:
    return f"mfa-service/v1/recovery/{user_id}/{code}".encode()


def hash_codes(keyring: Keyring, user_id: str, codes: list[str]) -> list[tuple[str, bytes]]:
    return [keyring.mac(code_message(user_id, normalise(c))) for c in codes]


class RecoveryCodes(CodeMethod):
    """The module behind the user's recovery-code factor (created by the service)."""

    method = Method.RECOVERY_CODE
    sends_code = False
    login_writes_deferred = False
    passes_hard_lockout = True  # >= 50 bits: see service/lockout.py

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring

    @property
    def code_length(self) -> int:
        return CODE_CHARS

    def channel_for(self, requested: Channel | None) -> Channel:
        if requested not in (None, Channel.NONE):
            raise InvalidArgument.single("channel", "must be unset or CHANNEL_NONE for "
                                                    "recovery codes")
        return Channel.NONE

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        raise InvalidArgument.single(
            "method", "recovery codes are issued with the first active factor, not enrolled")

    def parse_code(self, raw: str) -> str:
        return normalise(raw)

    def new_code(self) -> str | None:
        return None

    async def check(self, tx: Transaction, record: FactorRecord, challenge: Challenge,
                    code: str, now: datetime) -> Verdict:
        # Which stored code it is, and whether it is unused, only the database can say
        # atomically: consume the one stored under any of the candidate hashes (one per
        # key in the ring), once.
        user_id = record.factor.user_id
        return Verdict.of(await tx.recovery.consume(
            user_id, self._keyring.mac_all(code_message(user_id, code)), now))
