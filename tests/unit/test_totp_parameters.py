"""The TOTP check with a factor's own parameters (SHA1/SHA256/SHA512, 6 or 8 digits, 30 or
60 s): RFC 6238 Appendix B, on the pure function."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from datetime import UTC, datetime

import pyotp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfa_service.domain import DEFAULT_TOTP, TotpAlgorithm, TotpParameters
from mfa_service.factors.totp import check_parameters, hotp, match_totp, time_step

# RFC 6238 Appendix B: the seed is the ASCII digits "1234567890" repeated to the length of
# the hash's output (20, 32 and 64 bytes).
SEEDS = {
    TotpAlgorithm.SHA1: b"12345678901234567890",
    TotpAlgorithm.SHA256: b"12345678901234567890123456789012",
    TotpAlgorithm.SHA512: b"1234567890123456789012345678901234567890123456789012345678901234",
}
# (Unix time, SHA1, SHA256, SHA512), 8 digits, X = 30 s, T0 = 0.
VECTORS: list[tuple[int, str, str, str]] = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
ALGORITHMS = (TotpAlgorithm.SHA1, TotpAlgorithm.SHA256, TotpAlgorithm.SHA512)


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


@pytest.mark.parametrize(("unix", "algorithm", "code"), [
    (row[0], algorithm, row[1 + i]) for row in VECTORS for i, algorithm in enumerate(ALGORITHMS)
])
def test_rfc6238_appendix_b_at_eight_digits(unix: int, algorithm: TotpAlgorithm,
                                            code: str) -> None:
    parameters = TotpParameters(algorithm=algorithm, digits=8, period=30)
    assert match_totp(SEEDS[algorithm], code, at(unix), window=0, last_step=None,
                      parameters=parameters) == unix // 30


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_code_of_another_algorithm_does_not_match(algorithm: TotpAlgorithm) -> None:
    """Same seed, same time: SHA1's code is not SHA256's (the parameters are used, not
    ignored)."""
    others = [a for a in ALGORITHMS if a is not algorithm]
    for other in others:
        code = dict(zip(ALGORITHMS, VECTORS[0][1:], strict=True))[other]
        assert match_totp(SEEDS[algorithm], code, at(59), window=1, last_step=None,
                          parameters=TotpParameters(algorithm, 8, 30)) is None


def test_eight_digit_codes_are_not_their_six_digit_tail() -> None:
    eight = TotpParameters(TotpAlgorithm.SHA1, 8, 30)
    assert match_totp(SEEDS[TotpAlgorithm.SHA1], "287082", at(59), window=0, last_step=None,
                      parameters=eight) is None
    assert match_totp(SEEDS[TotpAlgorithm.SHA1], "287082", at(59), window=0,
                      last_step=None) == 1  # the default, 6 digits


def test_sixty_second_steps_count_in_their_own_period() -> None:
    """With X = 60 a code lives for a whole minute and steps are numbered in minutes."""
    sixty = TotpParameters(TotpAlgorithm.SHA256, 8, 60)
    seed = SEEDS[TotpAlgorithm.SHA256]
    step = 1111111109 // 60
    code = _hotp(seed, "sha256", step, 8)
    assert match_totp(seed, code, at(1111111109), window=0, last_step=None,
                      parameters=sixty) == step
    # 59 s into the step it still matches; at the next minute it no longer does.
    assert match_totp(seed, code, at(step * 60 + 59), window=0, last_step=None,
                      parameters=sixty) == step
    assert match_totp(seed, code, at(step * 60 + 60), window=0, last_step=None,
                      parameters=sixty) is None
    # The window is one 60-s step each way.
    assert match_totp(seed, code, at(step * 60 + 60), window=1, last_step=None,
                      parameters=sixty) == step
    # The same code under 30-s steps belongs to another time altogether.
    assert match_totp(seed, code, at(1111111109), window=1, last_step=None,
                      parameters=TotpParameters(TotpAlgorithm.SHA256, 8, 30)) is None
    # Replay: a step not newer than the last accepted one is refused in 60-s steps too.
    assert match_totp(seed, code, at(1111111109), window=1, last_step=step,
                      parameters=sixty) is None
    assert time_step(at(1111111109), 60) == step


def _hotp(seed: bytes, digest: str, counter: int, digits: int) -> str:
    """RFC 4226 section 5.3 written out, as an oracle independent of the code under test."""
    mac = hmac.new(seed, struct.pack(">Q", counter), digest).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return f"{value % 10 ** digits:0{digits}d}"


@pytest.mark.parametrize(("parameters", "message"), [
    (TotpParameters(TotpAlgorithm.SHA1, 7, 30), "digits must be 6 or 8"),
    (TotpParameters(TotpAlgorithm.SHA1, 10, 30), "digits must be 6 or 8"),
    (TotpParameters(TotpAlgorithm.SHA1, 6, 15), "period must be 30 or 60"),
    (TotpParameters(TotpAlgorithm.SHA512, 8, 90), "period must be 30 or 60"),
])
def test_unsupported_parameters_are_refused(parameters: TotpParameters, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_parameters(parameters)
    with pytest.raises(ValueError, match=message):
        match_totp(SEEDS[TotpAlgorithm.SHA1], "12345678", at(59), window=0, last_step=None,
                   parameters=parameters)


def test_the_defaults_are_rfc6238s() -> None:
    assert TotpParameters(TotpAlgorithm.SHA1, 6, 30) == DEFAULT_TOTP


@given(secret=st.binary(min_size=16, max_size=64), counter=st.integers(0, 2**40),
       digits=st.sampled_from((6, 8)), algorithm=st.sampled_from(ALGORITHMS))
def test_hotp_agrees_with_pyotp(secret: bytes, counter: int, digits: int,
                                algorithm: TotpAlgorithm) -> None:
    """The matcher computes codes itself, on the raw secret; pyotp (what the enrolment's
    otpauth URI and the load generator use) must give the very same code everywhere."""
    reference = pyotp.HOTP(base64.b32encode(secret).decode(), digits=digits,
                           digest=getattr(hashlib, algorithm.value))
    assert hotp(secret, counter, digits, algorithm.value) == reference.at(counter)
