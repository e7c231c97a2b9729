"""Caller authentication: which backend is calling, and what it may do.

Two ways to prove it, configured per caller in a TOML callers file:

- **mTLS**: the client certificate (verified against MFA_TLS_CLIENT_CA_FILE by the TLS
  stack) names the caller by its subject CN or a DNS/URI subject alternative name.
- **Bearer token** in the ``authorization`` metadata. The file holds only the SHA-256 of
  each token: tokens are 256-bit random strings (``mfa-service callers new-token``), so
  a fast hash is enough (no dictionary to attack), and compare_digest keeps it
  constant-time.

::

    [[callers]]
    name = "portal-backend"
    applications = ["portal"]
    token_sha256 = ["9f86d0...", "..."]      # several: rotate without downtime
    certificate_names = ["portal.internal"]
    audit_reader = false
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfa_service.domain import Application, Caller
from mfa_service.errors import ConfigurationError, Unauthenticated

# The development caller: only ever used on loopback without a callers file.
ANONYMOUS = Caller(name="anonymous-dev", applications=frozenset(Application),
                   audit_reader=True)
# Who a call is before authentication said otherwise: allowed nothing, so a code path
# that forgets to authenticate fails closed.
NOBODY = Caller(name="unauthenticated")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(token, its sha256) for a new caller entry."""
    token = "mfa_" + secrets.token_urlsafe(32)
    return token, token_hash(token)


@dataclass(frozen=True)
class _Entry:
    caller: Caller
    token_hashes: tuple[bytes, ...]
    certificate_names: frozenset[str]


class CallerRegistry:
    """The known callers; ``authenticate`` turns call metadata into a Caller."""

    def __init__(self, entries: Sequence[_Entry]) -> None:
        if not entries:
            raise ConfigurationError("the callers file defines no caller")
        self._entries = list(entries)

    @classmethod
    def from_file(cls, path: Path) -> CallerRegistry:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read callers file {path}: {exc}") from exc
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "callers") -> CallerRegistry:
        entries, names = [], set()
        for i, raw in enumerate(data.get("callers", [])):
            where = f"{source}: callers[{i}]"
            name = raw.get("name")
            if not isinstance(name, str) or not name or name in names:
                raise ConfigurationError(f"{where}: a unique non-empty name is required")
            names.add(name)
            try:
                apps = frozenset(Application(a) for a in raw.get("applications", []))
            except ValueError as exc:
                raise ConfigurationError(f"{where}: applications are 'portal' or "
                                         "'backoffice'") from exc
            hashes = tuple(_hex(h, where) for h in raw.get("token_sha256", []))
            cert_names = frozenset(str(n) for n in raw.get("certificate_names", []))
            if not hashes and not cert_names:
                raise ConfigurationError(f"{where}: give token_sha256 or certificate_names")
            entries.append(_Entry(Caller(name, apps, bool(raw.get("audit_reader", False))),
                                  hashes, cert_names))
        return cls(entries)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]],
                     auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
        """The caller proven by a bearer token, else by the client certificate."""
        bearer = None
        for key, value in metadata:
            if key.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, credential = text.partition(" ")
                if scheme.lower() != "bearer" or not credential:
                    raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
                bearer = credential.strip()
        if bearer is not None:
            digest = hashlib.sha256(bearer.encode()).digest()
            found = None
            for entry in self._entries:  # look at every entry: no timing hint
                for known in entry.token_hashes:
                    if hmac.compare_digest(known, digest):
                        found = entry.caller
            if found is None:
                raise Unauthenticated("unknown bearer token")
            return found
        names = {n.decode(errors="replace") for key in (
            "x509_common_name", "x509_subject_alternative_name")
            for n in auth_context.get(key, [])}
        if names:
            for entry in self._entries:
                if entry.certificate_names & names:
                    return entry.caller
            raise Unauthenticated("the client certificate names no known caller")
        raise Unauthenticated("caller credentials required: a client certificate or "
                              "'authorization: Bearer <token>' metadata")


def _hex(value: object, where: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigurationError(f"{where}: token_sha256 entries are 64 hex characters")
    return raw
