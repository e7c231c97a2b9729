"""The passkey settings: production needs an explicit RP ID and origins, origins that could
never pass are refused at start-up, and the development defaults fit the reference portal
and backoffice. (Passkeys through the real server: tests/api/test_passkey.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from mfa_service.settings import Settings
from tests.support.config import TEST_KEYRING


def _production(**extra: Any) -> dict[str, Any]:
    return {"env": "production", "keyring": TEST_KEYRING, "tls_cert_file": "c",
            "tls_key_file": "k", "callers_file": "callers.toml", "email_provider": "smtp",
            "phone_provider": "webhook", "phone_webhook_url": "https://sms.internal/send",
            **extra}


def test_production_refuses_passkeys_without_an_explicit_rp_id_and_origins() -> None:
    with pytest.raises(ValueError, match="MFA_WEBAUTHN_RP_ID and MFA_WEBAUTHN_ORIGINS"):
        Settings.model_validate(_production())
    with pytest.raises(ValueError, match="MFA_WEBAUTHN_RP_ID and MFA_WEBAUTHN_ORIGINS"):
        Settings.model_validate(_production(webauthn_rp_id="example.com"))
    off = Settings.model_validate(_production(passkeys_enabled=False))
    assert not off.passkeys_enabled
    on = Settings.model_validate(_production(
        webauthn_rp_id="example.com",
        webauthn_origins="https://portal.example.com, https://example.com"))
    assert on.origins == ("https://portal.example.com", "https://example.com")


@pytest.mark.parametrize(("origins", "complaint"), [
    ("https://portal.example.org", "not on the RP ID"),
    ("http://portal.example.com", "must be https"),
    ("https://portal.example.com/login", "is not an origin"),
    ("https://notexample.com", "not on the RP ID"),
])
def test_origins_that_could_never_pass_are_refused_at_start_up(
        origins: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        Settings.model_validate(_production(webauthn_rp_id="example.com",
                                            webauthn_origins=origins))


def test_development_defaults_fit_the_reference_portal_and_backoffice() -> None:
    settings = Settings.model_validate({"keyring": TEST_KEYRING})
    assert settings.rp_id == "localhost"
    assert settings.origins == ("http://localhost:8080", "http://localhost:8081")
