"""Demo users of the central login: names and scrypt password hashes.

A demo, written the way a real password store should be: a per-user random salt, scrypt
(memory-hard), a constant-time comparison, and the same work for an unknown name as for a
wrong password (no oracle for which names exist). Seeded with ``alice`` and ``bob``; new
demo accounts can be created on the sign-up page and are kept in a JSON file when the
launcher gives one (the service keeps their factors across restarts too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

DEMO_PASSWORD = "correct horse battery"  # noqa: S105 - shown on the login page on purpose
DEMO_USERS = ("alice", "bob")
USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,31}$")
MIN_PASSWORD = 8
ACCOUNT_EMAIL_DOMAIN = "example.org"

# scrypt cost: n=2**14, r=8 is 16 MiB and ~50 ms per hash, enough for a demo login.
_N, _R, _P = 2**14, 8, 1


@dataclass(frozen=True)
class PasswordHash:
    salt: bytes
    digest: bytes

    @classmethod
    def make(cls, password: str) -> PasswordHash:
        salt = secrets.token_bytes(16)
        return cls(salt, _scrypt(password, salt))

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(_scrypt(password, self.salt), self.digest)

    def to_json(self) -> dict[str, str]:
        return {"salt": self.salt.hex(), "digest": self.digest.hex()}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> PasswordHash:
        return cls(bytes.fromhex(data["salt"]), bytes.fromhex(data["digest"]))


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)


class UserExists(Exception):
    pass


class Users:
    """Usernames and password hashes, optionally persisted to ``path`` (JSON)."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._hashes: dict[str, PasswordHash] = {}
        if path is not None and path.exists():
            data = json.loads(path.read_text("utf-8"))
            self._hashes = {name: PasswordHash.from_json(h) for name, h in data.items()}
        for name in DEMO_USERS:
            self._hashes.setdefault(name, PasswordHash.make(DEMO_PASSWORD))
        # Compared against when the name is unknown, so both cases cost one scrypt.
        self._dummy = PasswordHash.make(secrets.token_hex(16))

    def authenticate(self, username: str, password: str) -> bool:
        known = self._hashes.get(username)
        ok = (known or self._dummy).matches(password)
        return ok and known is not None

    def create(self, username: str, password: str) -> None:
        new = PasswordHash.make(password)
        with self._lock:
            if username in self._hashes:
                raise UserExists(username)
            self._hashes[username] = new
            if self._path is not None:
                data = {name: h.to_json() for name, h in self._hashes.items()}
                tmp = self._path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data), "utf-8")
                tmp.replace(self._path)


def account_email(username: str) -> str:
    """The account's own email address, which mfa-service also sends security notices to
    (``account_email`` on Verify and Disable), so a user whose only factor is an app or
    a passkey hears of changes too. The demo accounts have no real mailbox: an address of
    the reserved example.org domain, which the demo SMTP sink catches. A real portal passes
    the address from its own user record."""
    return f"{username}@{ACCOUNT_EMAIL_DOMAIN}"


def check_new_account(username: str, password: str) -> str | None:
    """What is wrong with a sign-up, or None."""
    if not USERNAME_RE.match(username):
        return ("Choose a username of 2-32 characters: lowercase letters, digits, "
                "'.', '_' or '-'.")
    if len(password) < MIN_PASSWORD:
        return f"Choose a password of at least {MIN_PASSWORD} characters."
    return None
