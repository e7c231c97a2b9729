"""Passkeys: WebAuthn Level 3 credentials, through py_webauthn (the ``webauthn`` package).

The browser, not the user, produces the proof: ``navigator.credentials.create()`` at
enrolment (a registration, verified on the PURPOSE_CONFIRM_ENROLLMENT challenge) and
``navigator.credentials.get()`` afterwards (an assertion signed by the credential's private
key). What this module adds to the library:

* **The WebAuthn challenge is derived, not stored**: HMAC(key, challenge_id) under the
  keyring. It is unpredictable without the key, unique per challenge row, and single use
  because the row is (an APPROVED or SUPERSEDED challenge takes no attempt). Verification
  accepts the derivation under every key of the ring, so a key rotation in the five minutes
  a ceremony lasts does not fail it.
* **The credential lives encrypted on its factor** (AES-256-GCM, factor and user as
  associated data, like a TOTP secret): id, public key, sign counter, AAGUID. The public key
  is not a secret, but a row edited to carry another key must not decrypt.
* **The sign counter** (W3C WebAuthn 6.1.1): a counter that does not grow, when either side
  is non-zero, means two authenticators hold one private key. The library would refuse it
  before checking the signature; we check it after, so only a *genuine* signature with a
  stale counter raises the clone alarm (anyone can send a made-up counter).
* **User verification is required** (UV flag) in both ceremonies: the passkey is then a
  two-factor proof on its own (possession + PIN/biometric), as NIST SP 800-63B AAL2 needs
  of a multi-factor cryptographic authenticator.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url, parse_client_data_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from mfa_service.crypto import Keyring
from mfa_service.domain import (
    Challenge,
    Channel,
    FactorRecord,
    FactorStatus,
    Method,
    ProofField,
    Purpose,
)
from mfa_service.errors import InvalidArgument
from mfa_service.factors.base import Alarm, EnrollInput, EnrollmentMaterial, Refusal, Verdict

if TYPE_CHECKING:
    from mfa_service.store.database import Transaction

log = logging.getLogger(__name__)

# SPEC: a passkey challenge is single use and lives at most five minutes (the browser's
# own timeout is set to the same, so it stops waiting when we stop accepting).
MAX_CHALLENGE_TTL = timedelta(minutes=5)
# A registration with a packed attestation and certificate chain is a few KiB; a response
# ten times that is not a browser's.
MAX_RESPONSE_BYTES = 64 * 1024
MAX_NAME = 64
DEFAULT_NAME = "Passkey"
CLONE_ALARM = Alarm.PASSKEY_COUNTER_REGRESSED

# Names of common authenticator models by AAGUID (the AAGUID is the model, not the
# device). py_webauthn carries no such table; these are published by the vendors and
# collected in the community list "passkey-authenticator-aaguids". Anything else is shown
# as "Passkey", which is also what "none" attestation with a zero AAGUID gives.
AAGUID_NAMES = {
    "fbfc3007-154e-4ecc-8c0b-6e020557d7bd": "iCloud Keychain",
    "dd4ec289-e01d-41c9-bb89-70fa845d4bf2": "iCloud Keychain (managed)",
    "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4": "Google Password Manager",
    "adce0002-35bc-c60a-648b-0b25f1f05503": "Chrome on Mac",
    "08987058-cadc-4b81-b6e1-30de50dcbe96": "Windows Hello",
    "9ddd1817-af5a-4672-a2b9-3e3dd95000a9": "Windows Hello",
    "6028b017-b1d4-4c02-b4b3-afcdafc96bb2": "Windows Hello",
    "bada5566-a7aa-401f-bd96-45619a55120d": "1Password",
    "d548826e-79b4-db40-a3d8-11116f7e8349": "Bitwarden",
    "531126d6-e717-415c-9320-3d9aa6981239": "Dashlane",
    "cb69481e-8ff7-4039-93ec-0a2729a154a8": "YubiKey 5 Series",
    "ee882879-721c-4913-9775-3dfcce97072a": "YubiKey 5 Series",
}


def passkey_name(aaguid: str) -> str:
    """What ListFactors shows for a passkey of this authenticator model."""
    return AAGUID_NAMES.get(aaguid.lower(), DEFAULT_NAME)


def credential_aad(factor_id: str, user_id: str) -> bytes:
    """Associated data binding a stored credential to its factor and user."""
    return f"mfa-service/v1/passkey-credential/{factor_id}/{user_id}".encode()


def challenge_message(challenge_id: str) -> bytes:
    return f"mfa-service/v1/webauthn-challenge/{challenge_id}".encode()


def user_handle(keyring: Keyring, user_id: str) -> bytes:
    """The WebAuthn user handle: opaque (W3C WebAuthn 14.6.1: no personal data, the
    authenticator may show or leak it) and stable per user, so that registering again on
    the same authenticator replaces its old discoverable credential instead of piling up.
    Derived under the primary key: a rotation changes the handle of later enrolments
    only, which is harmless (assertions are checked against the factor's credential)."""
    return keyring.mac(f"mfa-service/v1/webauthn-user/{user_id}".encode())[1][:32]


@dataclass(frozen=True)
class StoredCredential:
    """What the factor keeps of its credential (encrypted as one blob)."""

    credential_id: bytes
    public_key: bytes  # COSE_Key
    sign_count: int
    aaguid: str
    transports: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return json.dumps({
            "id": bytes_to_base64url(self.credential_id),
            "pk": bytes_to_base64url(self.public_key),
            "n": self.sign_count, "aaguid": self.aaguid,
            "tr": list(self.transports)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, blob: bytes) -> StoredCredential:
        d = json.loads(blob)
        return cls(credential_id=base64url_to_bytes(d["id"]),
                   public_key=base64url_to_bytes(d["pk"]), sign_count=int(d["n"]),
                   aaguid=str(d["aaguid"]), transports=tuple(d.get("tr", ())))

    def descriptor(self) -> PublicKeyCredentialDescriptor:
        known = {t.value for t in AuthenticatorTransport}
        return PublicKeyCredentialDescriptor(
            id=self.credential_id,
            transports=[AuthenticatorTransport(t) for t in self.transports if t in known]
            or None)


# A string literal of JSON (escapes included); linear, no backtracking.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# credential.toJSON() opens about five objects and arrays (response, transports,
# clientExtensionResults and an extension or two); far more is not a browser's.
MAX_BRACKETS = 64
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_BINARY_FIELDS = ("clientDataJSON", "attestationObject", "authenticatorData", "signature",
                  "publicKey")
MAX_TRANSPORTS = 16
MAX_TRANSPORT_CHARS = 32


def _is_base64url(value: object) -> bool:
    # A length of 1 mod 4 decodes to nothing valid (binascii.Error in the library).
    return (isinstance(value, str) and _BASE64URL.fullmatch(value) is not None
            and len(value.rstrip("=")) % 4 != 1)


def _shape_problem(parsed: object) -> str | None:
    """What is wrong with the shape of a registration or assertion, or None. Checks the
    type of every field read here or by py_webauthn, so neither meets an int where it
    iterates a list (its own checks cover some fields, not all)."""
    if not isinstance(parsed, dict):
        return "not a JSON object"
    if parsed.get("type") != "public-key":
        return "type must be 'public-key'"
    if not (isinstance(parsed.get("id"), str) and parsed["id"]):
        return "id must be a string"
    for name in ("id", "rawId"):
        if name in parsed and not _is_base64url(parsed[name]):
            return f"{name} must be base64url"
    response = parsed.get("response")
    if not isinstance(response, dict):
        return "response must be an object"
    for name in _BINARY_FIELDS:
        if response.get(name) is not None and not _is_base64url(response[name]):
            return f"response.{name} must be base64url"
    if response.get("clientDataJSON") is None:
        return "response.clientDataJSON is required"
    registration = response.get("attestationObject") is not None
    assertion = (response.get("authenticatorData") is not None
                 and response.get("signature") is not None)
    if not (registration or assertion):
        return ("response needs attestationObject (a registration) or authenticatorData "
                "and signature (an assertion)")
    handle = response.get("userHandle")
    if handle is not None and not _is_base64url(handle):
        return "response.userHandle must be base64url or null"
    transports = response.get("transports")
    if transports is not None and not (
            isinstance(transports, list) and len(transports) <= MAX_TRANSPORTS
            and all(isinstance(t, str) and len(t) <= MAX_TRANSPORT_CHARS for t in transports)):
        return f"response.transports must be a list of at most {MAX_TRANSPORTS} strings"
    algorithm = response.get("publicKeyAlgorithm")
    if algorithm is not None and (not isinstance(algorithm, int) or isinstance(algorithm, bool)):
        return "response.publicKeyAlgorithm must be an integer"
    attachment = parsed.get("authenticatorAttachment")
    if attachment is not None and not isinstance(attachment, str):
        return "authenticatorAttachment must be a string or null"
    extensions = parsed.get("clientExtensionResults")
    if extensions is not None and not isinstance(extensions, dict):
        return "clientExtensionResults must be an object"
    return None


def _refusal(exc: Exception) -> str:
    """What the log says of a refused response: py_webauthn's own message says which check
    failed (origin, RP ID, UV...) and names no secret; anything else only its class (its
    text may quote the caller's bytes). ascii(): a lone surrogate from the caller's JSON
    must not break the log handler."""
    if isinstance(exc, WebAuthnException):
        return ascii(str(exc))[:200]
    return type(exc).__name__


@dataclass(frozen=True)
class RelyingParty:
    """Who the credentials are for (settings: MFA_WEBAUTHN_*)."""

    rp_id: str
    name: str
    origins: tuple[str, ...]


class Passkey:
    """METHOD_PASSKEY."""

    method = Method.PASSKEY
    sends_code = False
    login_writes_deferred = True
    proof_field = ProofField.WEBAUTHN_RESPONSE
    max_challenge_ttl: timedelta | None = MAX_CHALLENGE_TTL
    passes_hard_lockout = False

    def __init__(self, keyring: Keyring, rp: RelyingParty) -> None:
        self._keyring = keyring
        self._rp = rp

    @property
    def code_length(self) -> int:
        return 0  # nothing to type

    def code_length_of(self, record: FactorRecord) -> int:
        return 0

    def channel_for(self, requested: Channel | None) -> Channel:
        if requested not in (None, Channel.NONE):
            raise InvalidArgument.single(
                "channel", "must be unset or CHANNEL_NONE for METHOD_PASSKEY")
        return Channel.NONE

    def begin_enrollment(self, request: EnrollInput) -> EnrollmentMaterial:
        # The credential does not exist yet: the browser makes it after Enroll answers, and
        # the confirmation (check, below) stores it. The label is the name the browser
        # shows for the account (user.name / displayName).
        label = request.account_name or request.user_id
        if len(label) > 128 or not label.isprintable():
            raise InvalidArgument.single("account_name",
                                         "must be printable, at most 128 characters")
        return EnrollmentMaterial(label=label, masked_destination=DEFAULT_NAME)

    def parse_code(self, raw: str) -> str:
        """Shape only: a JSON object as ``PublicKeyCredential.toJSON()`` makes it, every
        field we or the library read of the type it must have. Whether it proves anything
        is ``check``'s question (a wrong proof counts an attempt; a malformed request does
        not)."""
        field = self.proof_field
        if not raw:
            raise InvalidArgument.single(
                field, "is required for METHOD_PASSKEY: the JSON of credential.toJSON()")
        if len(raw.encode()) > MAX_RESPONSE_BYTES:
            raise InvalidArgument.single(field, f"must be at most {MAX_RESPONSE_BYTES} bytes")
        # Bound the nesting before the parser recurses into it (2,000 levels raise
        # RecursionError): every bracket outside a string counted, at C speed.
        outside = _JSON_STRING.sub("", raw)
        if outside.count("[") + outside.count("{") > MAX_BRACKETS:
            raise InvalidArgument.single(field, "is nested too deeply for credential.toJSON()")
        try:
            parsed = json.loads(raw)
        except Exception:  # caller input: whatever the parser raises, it is
            # the caller's malformed request, not our failure (and no traceback to log)
            raise InvalidArgument.single(field, "must be JSON (credential.toJSON())") from None
        problem = _shape_problem(parsed)
        if problem is not None:
            raise InvalidArgument.single(
                field, f"must be a PublicKeyCredential as JSON (credential.toJSON()): {problem}")
        return raw

    def new_code(self) -> str | None:
        return None

    def _challenge_bytes(self, challenge_id: str) -> bytes:
        return self._keyring.mac(challenge_message(challenge_id))[1]

    def _stored(self, record: FactorRecord) -> StoredCredential | None:
        if record.secret_ciphertext is None or record.secret_key_id is None:
            return None  # not confirmed yet, or disabled (the credential was wiped)
        return StoredCredential.decode(self._keyring.decrypt(
            record.secret_key_id, record.secret_ciphertext,
            credential_aad(record.factor.factor_id, record.factor.user_id)))

    async def browser_options(self, tx: Transaction, record: FactorRecord,
                              challenge: Challenge) -> str | None:
        """The JSON for ``parseCreationOptionsFromJSON`` (confirming an enrolment) or
        ``parseRequestOptionsFromJSON`` (every other purpose)."""
        timeout_ms = int(MAX_CHALLENGE_TTL.total_seconds() * 1000)
        factor = record.factor
        if challenge.purpose is Purpose.CONFIRM_ENROLLMENT:
            # excludeCredentials: the user's other passkeys, so an authenticator that
            # already holds one says so instead of making a second (W3C WebAuthn 5.4).
            exclude = [c.descriptor() for c in await self._active_credentials(tx, record)]
            return options_to_json(generate_registration_options(
                rp_id=self._rp.rp_id, rp_name=self._rp.name,
                user_id=user_handle(self._keyring, factor.user_id),
                user_name=record.label, user_display_name=record.label,
                challenge=self._challenge_bytes(challenge.challenge_id),
                timeout=timeout_ms, exclude_credentials=exclude,
                authenticator_selection=AuthenticatorSelectionCriteria(
                    resident_key=ResidentKeyRequirement.PREFERRED,
                    user_verification=UserVerificationRequirement.REQUIRED)))
        stored = self._stored(record)
        return options_to_json(generate_authentication_options(
            rp_id=self._rp.rp_id, challenge=self._challenge_bytes(challenge.challenge_id),
            timeout=timeout_ms,
            allow_credentials=[stored.descriptor()] if stored is not None else [],
            user_verification=UserVerificationRequirement.REQUIRED))

    async def _active_credentials(self, tx: Transaction,
                                  record: FactorRecord) -> list[StoredCredential]:
        """The credentials of the user's other ACTIVE passkeys."""
        found = []
        for other in await tx.factors.list_for_user(record.factor.user_id):
            if (other.factor.method is Method.PASSKEY
                    and other.factor.status is FactorStatus.ACTIVE
                    and other.factor.factor_id != record.factor.factor_id):
                stored = self._stored(other)
                if stored is not None:
                    found.append(stored)
        return found

    def _expected_challenge(self, response: dict[str, Any], challenge_id: str) -> bytes | None:
        """The challenge the response signed, if it is this challenge's under some key
        of the ring (constant-time); None otherwise (another challenge's response)."""
        try:
            client_data = parse_client_data_json(
                base64url_to_bytes(response["response"]["clientDataJSON"]))
        except Exception:  # caller input, however it fails to parse
            return None
        signed = client_data.challenge
        found = None
        for candidate in self._keyring.mac_all(challenge_message(challenge_id)):
            if hmac.compare_digest(candidate, signed):
                found = candidate
        return found

    async def check(self, tx: Transaction, record: FactorRecord, challenge: Challenge,
                    code: str, now: datetime) -> Verdict:
        response = json.loads(code)  # parse_code made sure it is a JSON object
        expected = self._expected_challenge(response, challenge.challenge_id)
        if expected is None:
            return Verdict.fail(Refusal.ANOTHER_CHALLENGE)
        if challenge.purpose is Purpose.CONFIRM_ENROLLMENT:
            return await self._register(tx, record, response, expected)
        return await self._authenticate(tx, record, response, expected, now)

    async def _register(self, tx: Transaction, record: FactorRecord, response: dict[str, Any],
                        expected: bytes) -> Verdict:
        try:
            verified = verify_registration_response(
                credential=response, expected_challenge=expected,
                expected_rp_id=self._rp.rp_id, expected_origin=list(self._rp.origins),
                require_user_verification=True)
        except Exception as exc:  # py_webauthn parses the caller's bytes
            # (CBOR, COSE, certificates) and may raise anything from them: a refusal, never
            # INTERNAL. The call is pure (no I/O), so nothing else can fail in it.
            log.info("passkey registration refused: %s", _refusal(exc))
            return Verdict.fail(Refusal.REGISTRATION_REFUSED)
        # excludeCredentials is only a request to the browser: a client that ignores it
        # must not register one authenticator as two "devices".
        if any(c.credential_id == verified.credential_id
               for c in await self._active_credentials(tx, record)):
            return Verdict.fail(Refusal.CREDENTIAL_ALREADY_REGISTERED)
        transports = response["response"].get("transports") or []  # list[str]: parse_code
        known = {t.value for t in AuthenticatorTransport}
        credential = StoredCredential(
            credential_id=verified.credential_id, public_key=verified.credential_public_key,
            sign_count=verified.sign_count, aaguid=verified.aaguid,
            transports=tuple(t for t in transports if t in known)[:8])
        key_id, ciphertext = self._keyring.encrypt(
            credential.encode(), credential_aad(record.factor.factor_id, record.factor.user_id))
        name = passkey_name(verified.aaguid)[:MAX_NAME]
        await tx.factors.store_credential(record.factor.factor_id, key_id, ciphertext,
                                          masked_destination=name)
        return Verdict(ok=True, display_name=name)

    async def _authenticate(self, tx: Transaction, record: FactorRecord,
                            response: dict[str, Any], expected: bytes,
                            now: datetime) -> Verdict:
        stored = self._stored(record)
        if stored is None:
            return Verdict.fail(Refusal.NO_CREDENTIAL)
        raw_id = response.get("rawId") or response.get("id")
        try:
            if base64url_to_bytes(str(raw_id)) != stored.credential_id:
                return Verdict.fail(Refusal.OTHER_CREDENTIAL)
            # Counter 0 here: the library would judge the counter before the signature;
            # we judge it below, once the signature is known to be genuine.
            verified = verify_authentication_response(
                credential=response, expected_challenge=expected,
                expected_rp_id=self._rp.rp_id, expected_origin=list(self._rp.origins),
                credential_public_key=stored.public_key, credential_current_sign_count=0,
                require_user_verification=True)
        except Exception as exc:  # as in _register: caller's bytes, pure call
            log.info("passkey assertion refused: %s", _refusal(exc))
            return Verdict.fail(Refusal.ASSERTION_REFUSED)
        new = verified.new_sign_count
        if (new > 0 or stored.sign_count > 0) and new <= stored.sign_count:
            # W3C WebAuthn 6.1.1: a signature counter that did not grow means the private
            # key may have been cloned. Refused, and audited for the security team.
            return Verdict(ok=False, alarm=CLONE_ALARM,
                           detail={"stored_counter": stored.sign_count, "presented_counter": new})
        key_id, ciphertext = self._keyring.encrypt(
            StoredCredential(stored.credential_id, stored.public_key, new, stored.aaguid,
                             stored.transports).encode(),
            credential_aad(record.factor.factor_id, record.factor.user_id))
        # With the login's touch of the row, as one deferred UPDATE (no extra statement).
        assert record.secret_ciphertext is not None
        tx.later.factors.use_with_secret(record.factor.factor_id, key_id, ciphertext, now,
                                   previous=record.secret_ciphertext)
        return Verdict(ok=True)
