"""Pure functions: RFC 6238 vectors, window and replay rules, keyring behaviour."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

import pytest

from mfa_service.crypto import DecryptionError, Keyring
from mfa_service.errors import ConfigurationError, InvalidArgument
from mfa_service.factors.codes import (
    code_matches,
    generate_numeric_code,
    hash_code,
    normalise_digits,
)
from mfa_service.factors.totp import match_totp, secret_aad, time_step

RFC_SECRET = b"12345678901234567890"  # RFC 6238 appendix B, SHA1 seed


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


@pytest.mark.parametrize(("unix", "eight_digits"), [
    (59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
    (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130"),
])
def test_rfc6238_vectors_match_their_step(unix: int, eight_digits: str) -> None:
    code = eight_digits[-6:]  # 6-digit codes are the low digits of the same HOTP value
    assert match_totp(RFC_SECRET, code, at(unix), window=0, last_step=None) == unix // 30


def test_window_accepts_one_step_each_way_only() -> None:
    code = "287082"  # step 1 (t=59)
    assert match_totp(RFC_SECRET, code, at(59 + 30), window=1, last_step=None) == 1
    assert match_totp(RFC_SECRET, code, at(59 - 30), window=1, last_step=None) == 1
    assert match_totp(RFC_SECRET, code, at(59 + 60), window=1, last_step=None) is None
    assert match_totp(RFC_SECRET, code, at(59 + 30), window=0, last_step=None) is None


def test_a_step_not_newer_than_the_last_accepted_is_refused() -> None:
    assert match_totp(RFC_SECRET, "287082", at(59), window=1, last_step=1) is None
    assert match_totp(RFC_SECRET, "287082", at(59), window=1, last_step=0) == 1


def test_time_step() -> None:
    assert time_step(at(59)) == 1
    assert time_step(at(60)) == 2


def test_numeric_codes_come_from_the_given_source() -> None:
    assert generate_numeric_code(6, lambda n: 7) == "777777"
    assert len(generate_numeric_code(8)) == 8
    with pytest.raises(ValueError, match="6-8"):
        generate_numeric_code(5)


def test_normalise_digits() -> None:
    assert normalise_digits(" 123 456 ", (6,)) == "123456"
    assert normalise_digits("123-456", (6,)) == "123456"
    for bad in ("12345", "1234567", "12a456", "１２３４５６", ""):
        with pytest.raises(InvalidArgument):
            normalise_digits(bad, (6,))


def test_code_hash_is_keyed_and_bound_to_its_challenge() -> None:
    ring = Keyring([("k1", os.urandom(32))])
    key_id, digest = hash_code(ring, "challenge-a", "123456")
    assert code_matches(ring, "challenge-a", "123456", key_id, digest)
    assert not code_matches(ring, "challenge-b", "123456", key_id, digest)
    assert not code_matches(ring, "challenge-a", "123457", key_id, digest)
    other = Keyring([("k1", os.urandom(32))])
    assert not code_matches(other, "challenge-a", "123456", key_id, digest)


def test_ciphertext_is_bound_to_its_factor() -> None:
    ring = Keyring([("k1", os.urandom(32))])
    key_id, blob = ring.encrypt(b"secret", secret_aad("f1", "u1"))
    assert ring.decrypt(key_id, blob, secret_aad("f1", "u1")) == b"secret"
    with pytest.raises(DecryptionError):
        ring.decrypt(key_id, blob, secret_aad("f2", "u1"))
    with pytest.raises(DecryptionError):
        ring.decrypt(key_id, blob[:-1] + bytes([blob[-1] ^ 1]), secret_aad("f1", "u1"))


def test_rotation_old_keys_still_read_new_primary_writes() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = Keyring([("k1", old_key)])
    kid, blob = old.encrypt(b"s", b"aad")
    _, mac_old = old.mac(b"token")
    rotated = Keyring([("k2", new_key), ("k1", old_key)])
    assert rotated.decrypt(kid, blob, b"aad") == b"s"
    assert rotated.encrypt(b"s", b"aad")[0] == "k2"
    assert mac_old in rotated.mac_all(b"token")
    assert rotated.mac_all(b"token")[0] == rotated.mac(b"token")[1]


def test_keyring_parsing() -> None:
    entry = Keyring.generate_entry("prod-2")
    ring = Keyring.parse(entry + "," + Keyring.generate_entry("prod-1"))
    assert ring.primary_id == "prod-2"
    assert ring.key_ids == ["prod-2", "prod-1"]
    short = "k:" + base64.urlsafe_b64encode(b"x" * 16).decode()
    for bad in ("nokey", short, entry + "," + entry, "bad id:" + entry.split(":")[1]):
        with pytest.raises(ConfigurationError):
            Keyring.parse(bad)


