"""A software WebAuthn authenticator and client: the user's browser and security key.

The load generator's ``passkey`` scenario and the tests of passkey sign-in need something
to answer the server's options the way a real browser would, without a browser. This
plays both ends of the user's side: the client
(it builds clientDataJSON and serialises the result exactly like
``PublicKeyCredential.toJSON()``, WebAuthn Level 3, base64url without padding) and the
authenticator (an ES256 key pair per credential, "none" attestation, a signature counter).

The input is the JSON the server emits (py_webauthn's ``options_to_json``); the output is
the string the server's endpoint receives. Unlike a browser it does not check that the
RP ID belongs to the origin: the ``origin`` / ``rp_id`` / ``user_verified`` overrides and
``tamper_signature`` exist so that tests can play a phishing page or a broken key and see
the server refuse it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ES256 = -7  # COSE algorithm: ECDSA w/ SHA-256 on P-256

FLAG_UP = 0x01  # user present
FLAG_UV = 0x04  # user verified
FLAG_AT = 0x40  # attested credential data included


class SoftAuthnError(Exception):
    """The ceremony could not produce a credential (a browser would reject its promise)."""


class CredentialExcluded(SoftAuthnError):
    """create(): one of our credentials is in excludeCredentials (the browser's
    InvalidStateError), so a user cannot register the same key twice."""


class UnsupportedAlgorithm(SoftAuthnError):
    """create(): pubKeyCredParams does not offer ES256 (-7), the only algorithm we have
    (the browser's NotSupportedError)."""


class NoCredential(SoftAuthnError):
    """get(): none of our credentials may answer these options (the browser's
    NotAllowedError after the user finds no usable key)."""


def b64url(data: bytes) -> str:
    """base64url without padding: the encoding of every binary field in the L3 JSON."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of b64url; tolerates missing padding (the JSON never carries it)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _Credential:
    """What the authenticator keeps per credential: the key, its RP and its user."""

    credential_id: bytes
    private_key: ec.EllipticCurvePrivateKey
    rp_id: str
    user_handle: bytes


class SoftAuthenticator:
    """A cross-platform (USB) security key with its browser, holding ES256 credentials.

    The signature counter is one per authenticator (as on many hardware keys): each get()
    increments it before signing. A test may assign ``counter`` (e.g. lower, to play a
    cloned key); the next get() then reports exactly that value, and increments from there.
    """

    def __init__(self, *, origin: str = "http://localhost:8080", aaguid: bytes = bytes(16),
                 user_verified: bool = True) -> None:
        if len(aaguid) != 16:
            raise ValueError("aaguid must be 16 bytes")
        self.origin = origin
        self.aaguid = aaguid
        self.user_verified = user_verified
        self._counter = 0
        self._counter_set = False
        self._credentials: dict[bytes, _Credential] = {}

    @property
    def counter(self) -> int:
        """The value the last ceremony reported (0 before any get())."""
        return self._counter

    @counter.setter
    def counter(self, value: int) -> None:
        # Pinned: the next get() reports this value as is rather than value + 1, so a test
        # reads "counter = 3" as "the next assertion says 3".
        if not 0 <= value < 2**32:
            raise ValueError("counter is 32 bits unsigned")
        self._counter = value
        self._counter_set = True

    def credential_ids(self) -> list[bytes]:
        """Our credentials' raw ids, in creation order (to build allow/exclude lists)."""
        return list(self._credentials)

    # -- navigator.credentials.create() ------------------------------------------------------
    def create(self, creation_options_json: str, *, origin: str | None = None,
               rp_id: str | None = None, user_verified: bool | None = None,
               credential_id: bytes | None = None) -> str:
        """Make a new ES256 credential for the options; returns the registration JSON
        (id, rawId, type, response{clientDataJSON, authenticatorData, transports,
        publicKey, publicKeyAlgorithm, attestationObject}, authenticatorAttachment,
        clientExtensionResults) with "none" attestation, and keeps the credential for get().

        The checks are those of a real browser and key that matter to a server: ES256 must
        be offered and no credential of ours may be in excludeCredentials.
        ``credential_id`` forces the new credential's id (a client claiming one it already
        registered, to test that the server refuses a duplicate).
        """
        options: dict[str, Any] = json.loads(creation_options_json)
        origin = self.origin if origin is None else origin
        options_rp_id = options["rp"].get("id") or _effective_domain(origin)
        rp_id = options_rp_id if rp_id is None else rp_id
        uv = self.user_verified if user_verified is None else user_verified

        offered = {(p.get("type"), p.get("alg")) for p in options["pubKeyCredParams"]}
        if ("public-key", ES256) not in offered:
            raise UnsupportedAlgorithm(f"pubKeyCredParams offers no ES256 (-7): {offered}")
        for excluded in options.get("excludeCredentials") or []:
            known = self._credentials.get(b64url_decode(excluded["id"]))
            if known is not None and known.rp_id == options_rp_id:
                raise CredentialExcluded(f"credential {excluded['id']} is in excludeCredentials")

        client_data = _client_data("webauthn.create", options["challenge"], origin)
        credential_id = os.urandom(32) if credential_id is None else credential_id
        private_key = ec.generate_private_key(ec.SECP256R1())
        numbers = private_key.public_key().public_numbers()
        cose_key = cbor2.dumps({1: 2, 3: ES256, -1: 1,
                                -2: numbers.x.to_bytes(32, "big"),
                                -3: numbers.y.to_bytes(32, "big")}, canonical=True)
        attested = (self.aaguid + len(credential_id).to_bytes(2, "big") + credential_id
                    + cose_key)
        # Registration does not advance the counter; it reports where the key stands.
        auth_data = _authenticator_data(rp_id, FLAG_UP | (FLAG_UV if uv else 0) | FLAG_AT,
                                        self._counter) + attested
        attestation_object = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data},
                                         canonical=True)
        self._credentials[credential_id] = _Credential(
            credential_id, private_key, options_rp_id, b64url_decode(options["user"]["id"]))

        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return json.dumps({
            "id": b64url(credential_id),
            "rawId": b64url(credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "transports": ["usb"],
                "publicKey": b64url(spki),
                "publicKeyAlgorithm": ES256,
                "attestationObject": b64url(attestation_object),
            },
            "authenticatorAttachment": "cross-platform",
            "clientExtensionResults": {},
        })

    # -- navigator.credentials.get() ---------------------------------------------------------
    def get(self, request_options_json: str, *, origin: str | None = None,
            rp_id: str | None = None, user_verified: bool | None = None,
            credential_id: bytes | None = None, tamper_signature: bool = False) -> str:
        """Assertion JSON from one of our credentials for the options' RP that is in
        allowCredentials (the newest for an empty list: a discoverable credential), or
        exactly ``credential_id`` if given (even one the options do not allow, to test that
        the server checks). Signs authenticatorData || SHA-256(clientDataJSON).

        ``rp_id`` forges the RP hash in authenticatorData only: the credential is still
        looked up by the options' rpId, as a real key would. ``tamper_signature`` signs
        other bytes, so the signature is well-formed DER that does not verify.
        """
        options: dict[str, Any] = json.loads(request_options_json)
        origin = self.origin if origin is None else origin
        options_rp_id = options.get("rpId") or _effective_domain(origin)
        rp_id = options_rp_id if rp_id is None else rp_id
        uv = self.user_verified if user_verified is None else user_verified
        credential = self._choose(options, options_rp_id, credential_id)

        if self._counter_set:
            self._counter_set = False
        else:
            self._counter = (self._counter + 1) % 2**32
        client_data = _client_data("webauthn.get", options["challenge"], origin)
        auth_data = _authenticator_data(rp_id, FLAG_UP | (FLAG_UV if uv else 0), self._counter)
        signed = auth_data + hashlib.sha256(client_data).digest()
        if tamper_signature:
            signed = bytes([signed[0] ^ 0x01]) + signed[1:]
        signature = credential.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))

        return json.dumps({
            "id": b64url(credential.credential_id),
            "rawId": b64url(credential.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(credential.user_handle),
            },
            "authenticatorAttachment": "cross-platform",
            "clientExtensionResults": {},
        })

    def _choose(self, options: dict[str, Any], options_rp_id: str,
                credential_id: bytes | None) -> _Credential:
        """The credential a real key would use: scoped to the RP, filtered by the allow list."""
        if credential_id is not None:
            try:
                return self._credentials[credential_id]
            except KeyError:
                raise NoCredential(f"no credential {b64url(credential_id)}") from None
        allowed = [b64url_decode(c["id"]) for c in options.get("allowCredentials") or []]
        candidates = [c for c in self._credentials.values() if c.rp_id == options_rp_id
                      and (not allowed or c.credential_id in allowed)]
        if not candidates:
            raise NoCredential(f"no credential for {options_rp_id!r} in allowCredentials")
        return candidates[0] if allowed else candidates[-1]


def _effective_domain(origin: str) -> str:
    """The RP ID a browser assumes when the options name none: the origin's host."""
    host = urlsplit(origin).hostname
    if not host:
        raise ValueError(f"origin {origin!r} has no host")
    return host


def _client_data(kind: str, challenge: str, origin: str) -> bytes:
    """clientDataJSON as browsers serialise it: compact, members in the spec's order."""
    return json.dumps({"type": kind, "challenge": b64url(b64url_decode(challenge)),
                       "origin": origin, "crossOrigin": False},
                      separators=(",", ":")).encode()


def _authenticator_data(rp_id: str, flags: int, counter: int) -> bytes:
    """rpIdHash || flags || signCount, the 37-byte head of every authenticatorData."""
    return hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + counter.to_bytes(4, "big")
