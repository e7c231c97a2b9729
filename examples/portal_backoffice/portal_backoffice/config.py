"""What both apps are told at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    #: mfa-service's gRPC address, HOST:PORT.
    mfa_target: str
    #: Signs the shared login cookie; both apps must have the same one.
    secret: str
    #: Where the apps are, as the browser sees them (origins, no trailing slash).
    portal_url: str = "http://localhost:8080"
    backoffice_url: str = "http://localhost:8081"
    #: Before adding a factor, a 2FA session older than this (seconds) is renewed by passing
    #: 2FA again. mfa-service accepts one for 10 minutes: ask a little before that, so the
    #: user is not sent back halfway through typing a code.
    step_up_max_age: float = 8 * 60
    #: "Remember this browser for N days" on the code page: mfa-service decides how long
    #: (MFA_TRUSTED_DEVICE_DAYS); keep the two equal so the words say what happens.
    remember_days: int = 30
    #: The product's one name: page titles and the header here, and (the launcher passes
    #: it on) mfa-service's MFA_PRODUCT_NAME for emails, texts and calls,
    #: MFA_TOTP_ISSUER for the authenticator app and MFA_WEBAUTHN_RP_NAME for passkeys.
    product_name: str = "Demo Portal"
