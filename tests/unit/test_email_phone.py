"""Production refuses the console senders (they print codes). (Email, SMS and voice codes end
to end: tests/api/test_email_phone.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mfa_service.settings import Settings
from tests.support.config import TEST_KEYRING


def test_production_refuses_console_senders() -> None:
    with pytest.raises(ValidationError) as err:
        Settings.model_validate({"env": "production", "keyring": TEST_KEYRING})
    assert "MFA_EMAIL_PROVIDER=console" in str(err.value)
    assert "MFA_PHONE_PROVIDER=console" in str(err.value)
