"""The self-service paths of the portal's profile, in Chromium: new recovery codes (with
the proof mfa-service asks for), removing a lost passkey with a recovery code, seeing and
ending one's other sessions, the security activity, and no dead end when a turn-off is
cancelled and started again."""

from __future__ import annotations

import re

from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.system.browser.conftest import Shots
from tests.system.browser.flows import (
    enrol_passkey,
    enrol_phone,
    factor_row,
    log_in,
    no_browser_error_names,
    pass_2fa_by_email,
    submit_code,
    turn_off,
    unique_phone,
    user_with_email,
    virtual_authenticator,
)
from tests.system.browser.stack import Stack


def test_make_new_recovery_codes_with_an_established_method(
        page: Page, stack: Stack, username: str, shot: Shots) -> None:
    address, old_codes = user_with_email(page, stack, username)
    enrol_phone(page, stack, unique_phone())  # added now: not established for a day
    page.click("#new-codes")
    expect(page.locator("h1")).to_have_text("Make new recovery codes")
    # Only the established method (the first one) is offered; the phone is explained.
    expect(page.locator(".choice")).to_have_count(1)
    expect(page.locator(".choice[data-method='email']")).to_be_visible()
    expect(page.locator("main")).to_contain_text("added less than a day ago: Phone")
    shot("choose-proof")
    before = stack.last_id()
    page.click(".prove-email")
    expect(page.locator("h1")).to_have_text("Make new recovery codes: confirm it's you")
    submit_code(page, stack.code_for(address, before))
    expect(page.locator("h1")).to_have_text("Your new recovery codes")
    codes = page.locator(".recovery-code").all_inner_texts()
    assert len(codes) == 10 and not set(codes) & set(old_codes)
    shot("new-codes")
    page.click("#continue")
    expect(page.get_by_role("status")).to_have_text(
        "Your new recovery codes are ready. The old ones no longer work.")
    expect(page.locator("#recovery-left")).to_contain_text("10")
    # The old codes are gone: one no longer logs in.
    page.click("#logout")
    log_in(page, stack, username)
    page.click("#use-recovery")
    submit_code(page, old_codes[0])
    expect(page.get_by_role("alert")).to_contain_text("not right")
    submit_code(page, codes[0])
    expect(page.locator("#session-info")).to_contain_text("(Recovery code)")


def test_new_recovery_codes_when_no_method_is_established_yet_says_when(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        shot: Shots) -> None:
    # The first method, turned off with its own code, and a second one added since: the
    # only method left is new, so the page says from when new codes can be made.
    address, _ = user_with_email(page, stack, username)
    virtual_authenticator(context, page)
    enrol_passkey(page, stack)
    before = stack.last_id()
    turn_off(page, "email", "#confirm")
    submit_code(page, stack.code_for(address, before))
    # The session came from email, so it ended with it: log in with the passkey.
    expect(page.get_by_role("status")).to_contain_text("Email is turned off.")
    page.click(".use-passkey")
    page.click("#passkey-button")
    expect(page.locator("#session-info")).to_contain_text("(Passkey)")
    page.click("#new-codes")
    expect(page.locator("#not-yet")).to_contain_text(
        re.compile(r"You can make new codes from \d+ \w+ \d{4}, \d\d:\d\d UTC\."))
    expect(page.locator("#cancel")).to_be_visible()
    shot("not-yet")


def test_remove_a_lost_passkey_with_a_recovery_code(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        shot: Shots) -> None:
    cdp, authenticator = virtual_authenticator(context, page)
    _, codes = user_with_email(page, stack, username)
    enrol_passkey(page, stack, label="Old phone")
    # The passkey is lost: the device no longer has it.
    cdp.send("WebAuthn.clearCredentials", {"authenticatorId": authenticator})
    turn_off(page, "passkey")
    expect(page.locator("h1")).to_have_text("Turn off passkey “Old phone”")
    page.click("#passkey-button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("The passkey was not used")
    no_browser_error_names(page)
    shot("passkey-not-there")
    page.click("#use-recovery-code")
    expect(page.locator("h1")).to_have_text("Turn off passkey “Old phone”")
    expect(page.locator("label[for=code]")).to_have_text("Recovery code")
    shot("recovery-code")
    submit_code(page, codes[0])
    expect(page.get_by_role("status")).to_have_text("Passkey “Old phone” is turned off.")
    expect(factor_row(page, "passkey")).to_have_count(0)
    expect(page.locator("#recovery-left")).to_contain_text("9")
    shot("removed")


def test_see_and_end_another_session(page: Page, browser: Browser, stack: Stack,
                                     username: str, shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    other_context = browser.new_context(user_agent=(
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"))
    other = other_context.new_page()
    try:
        log_in(other, stack, username)
        pass_2fa_by_email(other, stack, address)
        expect(other.locator("#session-info")).to_be_visible()
        page.click("#sessions")
        expect(page.locator("h1")).to_have_text("Your sessions")
        rows = page.locator("#sessions tr.session")
        expect(rows).to_have_count(2)
        expect(page.locator("tr.session.current")).to_contain_text("This browser")
        expect(page.locator("tr.session", has_text="Safari on iPhone")).to_contain_text(
            "2FA: passed with email")
        shot("two-sessions")
        page.locator("tr.session", has_text="Safari on iPhone").locator(".end-session").click()
        expect(page.get_by_role("status")).to_have_text("That session is signed out.")
        expect(page.locator("#sessions tr.session")).to_have_count(1)
        # The other browser is logged out of both applications.
        other.goto(f"{stack.portal}/profile")
        expect(other).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))
        other.goto(f"{stack.backoffice}/")
        expect(other).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))
        # Log in there again, then sign out everywhere from here.
        log_in(other, stack, username)
        pass_2fa_by_email(other, stack, address)
        page.goto(f"{stack.portal}/profile/sessions")
        page.click("#end-all")
        expect(page.get_by_role("status")).to_have_text(
            "You are signed out everywhere: every browser, and the backoffice too.")
        for browser_page in (page, other):
            browser_page.goto(f"{stack.backoffice}/")
            expect(browser_page).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))
    finally:
        other_context.close()


def test_security_activity_in_plain_words(page: Page, stack: Stack, username: str,
                                          shot: Shots) -> None:
    user_with_email(page, stack, username)
    page.click("#activity")
    expect(page.locator("h1")).to_have_text("Security activity")
    events = page.locator("#activity tr.event")
    expect(events.first).to_contain_text("Logged in with email")
    expect(page.locator("#activity")).to_contain_text("Turned on email")
    no_browser_error_names(page)
    assert "factor_confirmed" not in page.locator("main").inner_text()
    shot("activity")


def test_no_dead_end_after_a_cancelled_turn_off(page: Page, stack: Stack, username: str,
                                                shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    before = stack.last_id()
    turn_off(page, "email")
    expect(page.locator("h1")).to_have_text("Turn off email")
    code = stack.code_for(address, before)
    page.click("#cancel")  # changed their mind...
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")
    sent = stack.last_id()
    turn_off(page, "email")  # ...and changed it back within the 30-s resend cooldown
    expect(page.locator("h1")).to_have_text("Turn off email")
    expect(page.get_by_role("status")).to_have_text(
        "We sent you a code moments ago, and it still works: type it below.")
    expect(page.locator("#cancel")).to_be_visible()
    assert stack.last_id() == sent  # no second code, so no cooldown to hit
    shot("same-step-again")
    submit_code(page, code)
    expect(page.get_by_role("status")).to_have_text("Email is turned off.")
