"""Keys, authenticated encryption and keyed hashes: the only module that touches key bytes.

Each key in the keyring has an id. From one 256-bit master key we derive (HKDF-SHA256,
RFC 5869) two independent sub-keys: one for AES-256-GCM, one for HMAC-SHA256, so the
same bytes are never used by two algorithms. Ciphertexts and hashes are stored with the
id of the key that made them; the primary key makes new ones, older keys keep reading
until they are removed (rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mfa_service.errors import ConfigurationError

KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per message (NIST SP 800-38D 8.2.2)


class DecryptionError(Exception):
    """A ciphertext did not authenticate: wrong key, wrong owner (AAD) or tampering."""


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"mfa-service/v1/" + purpose).derive(master)


@dataclass(frozen=True)
class _Key:
    aead: AESGCM
    mac_key: bytes


class Keyring:
    """Named 256-bit keys; the first (primary) encrypts and hashes new values."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigurationError("the keyring is empty")
        self._keys: dict[str, _Key] = {}
        for key_id, master in keys:
            if not key_id or not key_id.isascii() or not key_id.replace("-", "").isalnum():
                raise ConfigurationError(f"key id {key_id!r} must be letters, digits or '-'")
            if len(master) != KEY_BYTES:
                raise ConfigurationError(f"key {key_id!r} must be {KEY_BYTES} bytes")
            if key_id in self._keys:
                raise ConfigurationError(f"key id {key_id!r} appears twice")
            self._keys[key_id] = _Key(AESGCM(_derive(master, b"aead")), _derive(master, b"hmac"))
        self.primary_id = keys[0][0]

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse ``kid:base64url[,kid:base64url...]`` (from ``mfa-service keys generate``)."""
        keys: list[tuple[str, bytes]] = []
        for part in spec.split(","):
            key_id, sep, encoded = part.strip().partition(":")
            if not sep:
                raise ConfigurationError("MFA_KEYRING entries look like kid:base64url-key")
            try:
                keys.append((key_id, base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))))
            except ValueError as exc:
                raise ConfigurationError(f"key {key_id!r} is not valid base64url") from exc
        return cls(keys)

    @staticmethod
    def generate_entry(key_id: str) -> str:
        """A new ``kid:base64url`` keyring entry from the OS CSPRNG."""
        encoded = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")
        return f"{key_id}:{encoded}"

    def _key(self, key_id: str) -> _Key:
        try:
            return self._keys[key_id]
        except KeyError:
            raise DecryptionError(f"unknown key id {key_id!r}") from None

    # -- authenticated encryption -------------------------------------------------------
    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """Encrypt under the primary key; ``aad`` binds the ciphertext to its owner."""
        nonce = os.urandom(NONCE_BYTES)
        return self.primary_id, nonce + self._keys[self.primary_id].aead.encrypt(
            nonce, plaintext, aad)

    def decrypt(self, key_id: str, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._key(key_id).aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise DecryptionError("ciphertext does not authenticate") from exc

    # -- keyed hashes -------------------------------------------------------------------
    def mac(self, data: bytes, key_id: str | None = None) -> tuple[str, bytes]:
        """HMAC-SHA256 of ``data`` under ``key_id`` (default: the primary key)."""
        kid = key_id or self.primary_id
        return kid, hmac.new(self._key(kid).mac_key, data, hashlib.sha256).digest()

    def mac_all(self, data: bytes) -> list[bytes]:
        """The HMAC under every key, primary first: for looking up a hashed token."""
        return [hmac.digest(k.mac_key, data, "sha256") for k in self._keys.values()]

    def verify_mac(self, data: bytes, key_id: str, expected: bytes) -> bool:
        """Constant-time check that ``expected`` is the HMAC of ``data``."""
        try:
            _, digest = self.mac(data, key_id)
        except DecryptionError:
            return False
        return hmac.compare_digest(digest, expected)


def load_or_create_key_file(path: Path) -> tuple[Keyring, bool]:
    """Read a development key file, creating it (mode 0600) if missing.

    Returns the keyring and whether the file was just created.
    """
    created = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = Keyring.generate_entry("dev-1")
        key_id, _, encoded = entry.partition(":")
        # O_EXCL: two workers starting together must not both write (and disagree).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                json.dump({"keys": [{"id": key_id, "key": encoded}]}, handle)
            created = True
    try:
        data = json.loads(path.read_text())
        spec = ",".join(f"{k['id']}:{k['key']}" for k in data["keys"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"cannot read key file {path}: {exc}") from exc
    return Keyring.parse(spec), created


def new_token(nbytes: int = 32) -> str:
    """An opaque bearer token of ``nbytes`` random bytes (256 bits by default), base64url."""
    return secrets.token_urlsafe(nbytes)
