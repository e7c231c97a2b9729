"""The software authenticator against py_webauthn itself: what it makes, a real relying-party
library accepts, and what it is told to break, that library refuses. Then server tests can
trust it as the user's browser and key."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import decode_credential_public_key, decoded_public_key_to_cryptography
from webauthn.helpers.exceptions import InvalidAuthenticationResponse, InvalidRegistrationResponse
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    UserVerificationRequirement,
)

from tests.support.softauthn import (
    CredentialExcluded,
    NoCredential,
    SoftAuthenticator,
    UnsupportedAlgorithm,
    b64url_decode,
)

RP_ID = "localhost"
ORIGIN = "http://localhost:8080"
USER_ID = b"user-1234"


def registration_options(exclude: list[bytes] | None = None) -> tuple[bytes, str]:
    options = generate_registration_options(
        rp_id=RP_ID, rp_name="MFA", user_id=USER_ID, user_name="ada",
        authenticator_selection=AuthenticatorSelectionCriteria(
            user_verification=UserVerificationRequirement.REQUIRED),
        exclude_credentials=[PublicKeyCredentialDescriptor(id=i) for i in exclude or []])
    return options.challenge, options_to_json(options)


def authentication_options(allow: list[bytes]) -> tuple[bytes, str]:
    options = generate_authentication_options(
        rp_id=RP_ID, allow_credentials=[PublicKeyCredentialDescriptor(id=i) for i in allow],
        user_verification=UserVerificationRequirement.REQUIRED)
    return options.challenge, options_to_json(options)


@dataclass
class Registered:
    key: SoftAuthenticator
    credential_id: bytes
    public_key: bytes  # COSE, as the server stores it
    sign_count: int


def register(key: SoftAuthenticator) -> Registered:
    challenge, options = registration_options()
    verified = verify_registration_response(
        credential=key.create(options), expected_challenge=challenge, expected_rp_id=RP_ID,
        expected_origin=ORIGIN, require_user_verification=True)
    return Registered(key, verified.credential_id, verified.credential_public_key,
                      verified.sign_count)


def sign_in(reg: Registered, response: str, challenge: bytes) -> int:
    verified = verify_authentication_response(
        credential=response, expected_challenge=challenge, expected_rp_id=RP_ID,
        expected_origin=ORIGIN, credential_public_key=reg.public_key,
        credential_current_sign_count=reg.sign_count, require_user_verification=True)
    reg.sign_count = verified.new_sign_count
    return verified.new_sign_count


def test_registration_is_accepted_and_json_is_l3_shaped() -> None:
    key = SoftAuthenticator()
    challenge, options = registration_options()
    response = key.create(options)
    verified = verify_registration_response(
        credential=response, expected_challenge=challenge, expected_rp_id=RP_ID,
        expected_origin=ORIGIN, require_user_verification=True)
    assert key.credential_ids() == [verified.credential_id]
    assert verified.sign_count == 0 and verified.user_verified
    assert verified.fmt == "none" and verified.aaguid == "00000000-0000-0000-0000-000000000000"
    body = json.loads(response)
    assert "=" not in response and body["type"] == "public-key"
    assert body["id"] == body["rawId"] and body["clientExtensionResults"] == {}
    # publicKey (SPKI) is the same key as the COSE one inside attestationObject.
    cose = decoded_public_key_to_cryptography(
        decode_credential_public_key(verified.credential_public_key))
    spki = cose.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    assert b64url_decode(body["response"]["publicKey"]) == spki
    assert body["response"]["publicKeyAlgorithm"] == -7
    assert json.loads(b64url_decode(body["response"]["clientDataJSON"])) == {
        "type": "webauthn.create", "challenge": json.loads(options)["challenge"],
        "origin": ORIGIN, "crossOrigin": False}


def test_assertions_are_accepted_and_count_up() -> None:
    reg = register(SoftAuthenticator())
    for expected in (1, 2):
        challenge, options = authentication_options([reg.credential_id])
        assert sign_in(reg, reg.key.get(options), challenge) == expected
    body = json.loads(reg.key.get(authentication_options([reg.credential_id])[1]))
    assert b64url_decode(body["response"]["userHandle"]) == USER_ID


def test_discoverable_sign_in_with_empty_allow_list() -> None:
    reg = register(SoftAuthenticator())
    challenge, options = authentication_options([])
    assert sign_in(reg, reg.key.get(options), challenge) == 1


Tamper = Callable[[SoftAuthenticator, str], str]
# Each fault with the reason py_webauthn must give (so it is refused for that reason).
REGISTRATION_FAULTS: dict[str, tuple[Tamper, str]] = {
    "wrong origin": (lambda k, o: k.create(o, origin="https://evil.example"), "origin"),
    "wrong rp_id": (lambda k, o: k.create(o, rp_id="evil.example"), "RP ID hash"),
    "no user verification": (lambda k, o: k.create(o, user_verified=False), "not verified"),
    "another challenge": (lambda k, o: k.create(registration_options()[1]), "challenge"),
}


@pytest.mark.parametrize("fault", REGISTRATION_FAULTS)
def test_faulty_registration_is_refused(fault: str) -> None:
    challenge, options = registration_options()
    make, reason = REGISTRATION_FAULTS[fault]
    response = make(SoftAuthenticator(), options)
    with pytest.raises(InvalidRegistrationResponse, match=reason):
        verify_registration_response(
            credential=response, expected_challenge=challenge, expected_rp_id=RP_ID,
            expected_origin=ORIGIN, require_user_verification=True)


ASSERTION_FAULTS: dict[str, tuple[Tamper, str]] = {
    "wrong origin": (lambda k, o: k.get(o, origin="https://evil.example"), "origin"),
    "wrong rp_id": (lambda k, o: k.get(o, rp_id="evil.example"), "RP ID hash"),
    "no user verification": (lambda k, o: k.get(o, user_verified=False), "not verified"),
    "tampered signature": (lambda k, o: k.get(o, tamper_signature=True), "signature"),
    "another challenge": (lambda k, o: k.get(authentication_options([])[1]), "challenge"),
}


@pytest.mark.parametrize("fault", ASSERTION_FAULTS)
def test_faulty_assertion_is_refused(fault: str) -> None:
    reg = register(SoftAuthenticator())
    challenge, options = authentication_options([reg.credential_id])
    make, reason = ASSERTION_FAULTS[fault]
    response = make(reg.key, options)
    with pytest.raises(InvalidAuthenticationResponse, match=reason):
        sign_in(reg, response, challenge)


def test_cloned_key_counter_is_refused() -> None:
    reg = register(SoftAuthenticator())
    for _ in range(3):
        challenge, options = authentication_options([reg.credential_id])
        sign_in(reg, reg.key.get(options), challenge)
    reg.key.counter = 2  # the clone lags behind the original
    challenge, options = authentication_options([reg.credential_id])
    with pytest.raises(InvalidAuthenticationResponse, match="sign count"):
        sign_in(reg, reg.key.get(options), challenge)


def test_exclude_credentials_is_honoured() -> None:
    reg = register(SoftAuthenticator())
    _, options = registration_options(exclude=[reg.credential_id])
    with pytest.raises(CredentialExcluded):
        reg.key.create(options)
    SoftAuthenticator().create(options)  # another key is not excluded


def test_client_refusals() -> None:
    key = SoftAuthenticator()
    _, options = registration_options()
    rs256_only = json.loads(options)
    rs256_only["pubKeyCredParams"] = [{"type": "public-key", "alg": -257}]
    with pytest.raises(UnsupportedAlgorithm):
        key.create(json.dumps(rs256_only))
    key.create(options)
    with pytest.raises(NoCredential):
        key.get(authentication_options([b"someone else's key"])[1])
