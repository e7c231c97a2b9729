"""Names users give their passkeys ("Work laptop"), kept by the portal.

mfa-service names a passkey after its authenticator's model where the AAGUID is known
(``Factor.masked_destination``: "YubiKey 5 Series", "Google Password Manager"), else
"Passkey". A user with two phones' passkeys needs to tell them apart, so the portal lets
them type a name when they add one and rename it later. The name is the portal's own
data (like the user's display name), keyed by user and factor id; this demo keeps it in
memory and, when the launcher gives a path, in a JSON file beside the demo users.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

MAX_NAME = 40


def clean_name(raw: str) -> str:
    """A name as typed, trimmed to one line of at most MAX_NAME characters."""
    return " ".join(raw.split())[:MAX_NAME]


class FactorNames:
    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._names: dict[str, dict[str, str]] = {}
        if path is not None and path.exists():
            self._names = json.loads(path.read_text("utf-8"))

    def of_user(self, user: str) -> dict[str, str]:
        with self._lock:
            return dict(self._names.get(user, {}))

    def set(self, user: str, factor_id: str, name: str) -> None:
        name = clean_name(name)
        with self._lock:
            names = self._names.setdefault(user, {})
            if name:
                names[factor_id] = name
            else:
                names.pop(factor_id, None)
            if self._path is not None:
                tmp = self._path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._names), "utf-8")
                tmp.replace(self._path)
