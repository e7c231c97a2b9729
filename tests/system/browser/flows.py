"""What a user does in the demo, step by step, as browser actions (shared by the tests)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import phonenumbers
import pyotp
from playwright.sync_api import BrowserContext, CDPSession, Page, expect

from tests.system.browser.stack import Stack

if TYPE_CHECKING:
    from tests.system.browser.conftest import Shots

PASSWORD = "browser-test-password"


def unique_phone() -> str:
    """A valid Danish mobile number, practically unique (per-destination send limits)."""
    while True:
        candidate = f"+452{uuid.uuid4().int % 10**7:07d}"
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate)):
            return candidate


def sign_up(page: Page, stack: Stack, username: str) -> None:
    page.goto(f"{stack.portal}/signup")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#signup")
    expect(page.get_by_role("status")).to_contain_text("demo account is ready")


def log_in(page: Page, stack: Stack, username: str, next_url: str = "") -> None:
    """The password step (on the portal's login page)."""
    if not page.url.startswith(f"{stack.portal}/login"):
        page.goto(f"{stack.portal}/login" + (f"?next={next_url}" if next_url else ""))
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#login")


def new_user(page: Page, stack: Stack, username: str) -> None:
    """A fresh demo account, logged in (password only: it has no factor yet)."""
    sign_up(page, stack, username)
    log_in(page, stack, username)
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")


def submit_code(page: Page, code: str) -> None:
    page.fill("#code", code)
    page.click("#submit-code")


def enrol_email(page: Page, stack: Stack, username: str) -> str:
    """Turn on email from the profile; returns the address. Ends on the page after it."""
    address = f"{username}@example.com"
    page.goto(f"{stack.portal}/profile")
    page.click("#add-email")
    page.fill("#email", address)
    before = stack.last_id()
    page.click("#start")
    expect(page.locator("#destination")).to_be_visible()
    submit_code(page, stack.code_for(address, before))
    return address


def finish_first_factor(page: Page) -> list[str]:
    """On the recovery codes page (the first factor): read them, continue."""
    codes = page.locator(".recovery-code").all_inner_texts()
    page.click("#continue")
    return codes


def pass_2fa_by_email(page: Page, stack: Stack, address: str) -> None:
    """On the method choice page: email a code, type it."""
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    before = stack.last_id()
    page.click("#use-email")
    submit_code(page, stack.code_for(address, before))


def user_with_email(page: Page, stack: Stack, username: str) -> tuple[str, list[str]]:
    """A user whose first factor is email, logged in with 2FA, on the profile page;
    returns the address and the recovery codes."""
    new_user(page, stack, username)
    address = enrol_email(page, stack, username)
    codes = finish_first_factor(page)
    # No second prompt right after the first factor: straight to the profile, with the
    # 2FA session mfa-service opened when the factor was confirmed (open_session).
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")
    expect(page.locator("#session-info")).to_contain_text("2FA passed on the portal")
    return address, codes


def enrol_phone(page: Page, stack: Stack, number: str, channel: str = "sms") -> None:
    page.goto(f"{stack.portal}/profile")
    page.click("#add-phone")
    page.fill("#phone_number", number)
    page.select_option("#channel", channel)
    before = stack.last_id()
    page.click("#start")
    expect(page.locator("#destination")).to_be_visible()
    submit_code(page, stack.code_for(number, before, channel=channel))


def enrol_app(page: Page, stack: Stack) -> tuple[str, Any]:
    """Turn on the authenticator app; returns (secret, TOTP). Stays on the QR page until
    the code is typed; the code used is the current step's."""
    page.goto(f"{stack.portal}/profile")
    page.click("#add-app")
    page.click("#start")
    expect(page.locator("#qr")).to_be_visible()
    secret = page.locator("#totp-secret").inner_text().strip()
    return secret, pyotp.TOTP(secret)


def next_step_code(totp: Any) -> str:
    """A code from the next 30-s step: accepted (±1 step of drift) and newer than one used
    a moment ago, so no test waits for the clock (the same step twice is a replay)."""
    return str(totp.at(time.time() + 30))


def factor_row(page: Page, slug: str) -> Any:
    return page.locator(f"#factors tr[data-method='{slug}']")


def turn_off(page: Page, slug: str, button: str = "#confirm") -> None:
    """Profile → "Turn off" on the method's row → the turn-off page's button."""
    page.locator(f".disable-{slug}").first.click()
    expect(page.locator("h1")).to_contain_text("Turn off")
    page.click(button)


def no_browser_error_names(page: Page) -> None:
    """A browser's exception names are for developers: never on a page."""
    text = page.locator("body").inner_text()
    for name in ("NotAllowedError", "InvalidStateError", "AbortError", "SecurityError",
                 "NotSupportedError", "ERROR_REASON", "Traceback"):
        assert name not in text, name


def virtual_authenticator(context: BrowserContext, page: Page,
                          verified: bool = True) -> tuple[CDPSession, str]:
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    added: dict[str, Any] = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": verified,
        "automaticPresenceSimulation": True}})
    return cdp, str(added["authenticatorId"])


def enrol_passkey(page: Page, stack: Stack, shot: Shots | None = None,
                  label: str = "") -> None:
    page.goto(f"{stack.portal}/profile")
    page.click("#add-passkey")
    if label:
        page.fill("#label", label)
    page.click("#start")
    # Fail fast with the portal's message when the server refuses (NOT_SUPPORTED).
    page.locator("#passkey-button, [role=alert]:not([hidden])").first.wait_for()
    alert = page.get_by_role("alert")
    assert alert.count() == 0, alert.inner_text()
    expect(page.locator("h1")).to_have_text(f"Turn on passkey “{label}”" if label
                                            else "Turn on passkey")
    if shot is not None:
        shot("passkey-enrolment")
    page.click("#passkey-button")
    expect(page.get_by_role("status")).to_have_text(
        f"Passkey “{label}” is turned on." if label else "Passkey is turned on.")
    expect(factor_row(page, "passkey").last).to_contain_text("On")
