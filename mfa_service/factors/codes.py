"""Pure functions for one-time codes: generation, normalisation, keyed hashing.

Codes are short, so their hash must be keyed (HMAC-SHA256, OWASP "One-Time Codes"):
an attacker with a database dump cannot brute-force 10^6 candidates without the key.
The challenge id is part of the hashed message, so a hash is useless on another challenge.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

from mfa_service.crypto import Keyring
from mfa_service.errors import InvalidArgument

MAX_CODE_INPUT = 64


def generate_numeric_code(length: int, randbelow: Callable[[int], int] = secrets.randbelow) -> str:
    """``length`` decimal digits from a CSPRNG (6 digits = 19.9 bits, 8 = 26.6 bits)."""
    if not 6 <= length <= 8:
        raise ValueError("code length must be 6-8 digits")
    return "".join(str(randbelow(10)) for _ in range(length))


def normalise_digits(raw: str, lengths: tuple[int, ...], field: str = "code") -> str:
    """Drop the spaces and dashes people type; insist on the expected number of digits."""
    if len(raw) > MAX_CODE_INPUT:
        raise InvalidArgument.single(field, f"must be at most {MAX_CODE_INPUT} characters")
    code = raw.replace(" ", "").replace("-", "")
    if not code:
        raise InvalidArgument.single(field, "is required")
    if not (code.isascii() and code.isdigit()) or len(code) not in lengths:
        expected = " or ".join(str(n) for n in lengths)
        raise InvalidArgument.single(field, f"must be {expected} digits")
    return code


def code_message(challenge_id: str, code: str) -> bytes:
    return f"mfa-service/v1/code/{challenge_id}/{code}".encode()


def hash_code(keyring: Keyring, challenge_id: str, code: str) -> tuple[str, bytes]:
    """(key id, HMAC) of a code bound to its challenge."""
    return keyring.mac(code_message(challenge_id, code))


def code_matches(keyring: Keyring, challenge_id: str, code: str, key_id: str,
                 stored: bytes) -> bool:
    """Constant-time comparison of a typed code with the stored HMAC."""
    return keyring.verify_mac(code_message(challenge_id, code), key_id, stored)


def destination_key(destination: str) -> bytes:
    """The key under which codes sent to an address or number are counted.

    SHA-256 of the case-folded destination: stable across key rotation (a window must
    not reset because the HMAC key changed), and the destination is contact data that
    the factors table already holds, not a secret. ``J@Example.com`` and
    ``j@example.com`` reach one mailbox, so they share a count.
    """
    return hashlib.sha256(b"mfa-service/v1/destination/" +
                          destination.strip().casefold().encode()).digest()


def phone_prefix_message(prefix: str) -> bytes:
    """What is HMACed (Keyring.mac) to count codes per number range: a prefix is
    low-sensitivity, but keyed all the same, so a database dump does not list the ranges
    users' numbers are in without the key."""
    return b"mfa-service/v1/phone-prefix/" + prefix.encode()


def lock_key_of(kind: str, value: str) -> bytes:
    """The advisory-lock key of a range or region (never stored; only its first 8 bytes
    reach PostgreSQL). Unkeyed so every process locks the same key whatever its keyring's
    primary key during a rotation."""
    return hashlib.sha256(f"mfa-service/v1/lock/{kind}/{value}".encode()).digest()
