"""Issue #7, the parts that need no server: production refuses plaintext delivery (but allows
a relay on this host), and an outgoing message never shows its text. (Every abuse path
through the real server: tests/api/test_abuse.py.)"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mfa_service.domain import Channel, MessageKind, Outgoing
from mfa_service.settings import Settings
from tests.support.config import T0, TEST_KEYRING

ETC = Path("/etc/mfa-service")  # named, never read: validation does not open the files


def production(**extra: Any) -> dict[str, Any]:
    return {"env": "production", "keyring": TEST_KEYRING, "tls_cert_file": ETC / "c",
            "tls_key_file": ETC / "k", "callers_file": ETC / "callers.toml",
            "email_provider": "smtp", "phone_provider": "webhook",
            "phone_webhook_url": "https://sms.internal/send",
            "webauthn_rp_id": "example.com",
            "webauthn_origins": "https://portal.example.com", **extra}


@pytest.mark.parametrize(("extra", "named"), [
    ({"smtp_tls": "none", "smtp_host": "smtp.example.com"}, "MFA_SMTP_TLS"),
    ({"phone_webhook_url": "http://sms.example.com/send"}, "MFA_PHONE_WEBHOOK_URL"),
    ({"phone_provider": "twilio", "twilio_base_url": "http://api.example.com",
      "twilio_account_sid": "AC1", "twilio_auth_token": "t", "twilio_from": "+4520123456"},
     "MFA_TWILIO_BASE_URL"),
])
def test_production_refuses_plaintext_delivery(extra: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings.model_validate(production(**extra))


def test_production_allows_a_plaintext_relay_on_this_host() -> None:
    settings = Settings.model_validate(production(
        smtp_tls="none", smtp_host="127.0.0.1", phone_webhook_url="http://localhost:8080/send"))
    assert settings.smtp_tls == "none"


def test_an_outgoing_message_never_shows_its_text() -> None:
    message = Outgoing(kind=MessageKind.CODE, channel=Channel.SMS, destination="+4520123456",
                       user_id="u", subject="", text="Your code is 482913",
                       not_after=T0 + timedelta(minutes=5))
    assert "482913" not in repr(message)
    assert "482913" not in str(message)
