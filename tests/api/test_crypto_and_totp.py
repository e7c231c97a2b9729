"""The development key file: created private (0600) on first start, read again after."""

from __future__ import annotations

import stat
from pathlib import Path

from mfa_service.crypto import load_or_create_key_file


def test_development_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "dev.keys"
    first, created = load_or_create_key_file(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second, created_again = load_or_create_key_file(path)
    assert not created_again
    kid, blob = first.encrypt(b"x", b"a")
    assert second.decrypt(kid, blob, b"a") == b"x"
