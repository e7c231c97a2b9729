"""Passkeys in the portal, with Chromium's virtual authenticator (CDP WebAuthn domain): a
platform authenticator with resident keys and user verification, present without a touch.
The page runs the real browser API: parseCreationOptionsFromJSON / credentials.create on
enrolment, parseRequestOptionsFromJSON / credentials.get on login and turning off."""

from __future__ import annotations

from playwright.sync_api import BrowserContext, Page, expect

from tests.system.browser.conftest import Shots
from tests.system.browser.flows import (
    enrol_passkey,
    factor_row,
    log_in,
    no_browser_error_names,
    turn_off,
    user_with_email,
    virtual_authenticator,
)
from tests.system.browser.stack import Stack


def test_enrol_a_passkey_and_log_in_with_it(page: Page, context: BrowserContext,
                                            stack: Stack, username: str,
                                            shot: Shots) -> None:
    cdp, authenticator = virtual_authenticator(context, page)
    user_with_email(page, stack, username)
    enrol_passkey(page, stack, shot)
    shot("passkey-on")
    stored = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    assert len(stored["credentials"]) == 1
    page.click("#logout")
    log_in(page, stack, username)
    page.click(".use-passkey")
    shot("passkey-login")
    page.click("#passkey-button")
    expect(page.locator("#session-info")).to_contain_text("(Passkey)")
    shot("logged-in-with-passkey")


def test_a_passkey_without_user_verification_is_refused(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        shot: Shots) -> None:
    cdp, authenticator = virtual_authenticator(context, page)
    user_with_email(page, stack, username)
    enrol_passkey(page, stack)
    page.click("#logout")
    log_in(page, stack, username)
    page.click(".use-passkey")
    # Presence only (no fingerprint, face or PIN): the login must not go through.
    cdp.send("WebAuthn.setUserVerified", {"authenticatorId": authenticator,
                                          "isUserVerified": False})
    page.click("#passkey-button")
    refusal = page.locator("#error:not([hidden])")
    expect(refusal).to_be_visible()
    no_browser_error_names(page)
    shot("refused")
    page.goto(f"{stack.portal}/profile")
    expect(page).to_have_url(f"{stack.portal}/2fa?next=%2Fprofile")


def test_turning_off_a_passkey_needs_the_passkey(page: Page, context: BrowserContext,
                                                 stack: Stack, username: str,
                                                 shot: Shots) -> None:
    virtual_authenticator(context, page)
    user_with_email(page, stack, username)
    enrol_passkey(page, stack)
    turn_off(page, "passkey")
    expect(page.locator("h1")).to_have_text("Turn off passkey")
    shot("confirm-with-passkey")
    page.click("#passkey-button")
    expect(page.get_by_role("status")).to_have_text("Passkey is turned off.")
    expect(factor_row(page, "passkey")).to_have_count(0)


def test_passkeys_are_told_apart_by_name_and_dates(page: Page, context: BrowserContext,
                                                   stack: Stack, username: str,
                                                   shot: Shots) -> None:
    virtual_authenticator(context, page)
    user_with_email(page, stack, username)
    enrol_passkey(page, stack, label="Work laptop")
    # A second passkey on another authenticator (a phone), without a name.
    second = context.new_page()
    virtual_authenticator(context, second)
    enrol_passkey(second, stack)
    second.close()
    page.goto(f"{stack.portal}/profile")
    rows = factor_row(page, "passkey")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("Work laptop")
    expect(rows.nth(0)).to_contain_text("last used")
    expect(rows.nth(1)).to_contain_text("Passkey")
    expect(rows.nth(0)).to_contain_text(" UTC")  # the date it was added
    shot("two-passkeys")
    # Rename the unnamed one.
    rows.nth(1).locator(".rename").click()
    expect(page.locator("h1")).to_have_text("Rename passkey")
    page.fill("#label", "Phone")
    page.click("#save")
    expect(page.get_by_role("status")).to_have_text("The new name is saved.")
    expect(factor_row(page, "passkey").nth(1)).to_contain_text("Phone")
    # The 2FA choice page names them too: never "Passkey Passkey".
    page.click("#logout")
    log_in(page, stack, username)
    choices = page.locator(".choice[data-method='passkey']")
    expect(choices.nth(0)).to_contain_text("Work laptop")
    expect(choices.nth(1)).to_contain_text("Phone")
    assert "Passkey Passkey" not in page.locator("main").inner_text()
    shot("choose-named-passkeys")


def test_turning_off_the_passkey_that_logged_in_says_so(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        shot: Shots) -> None:
    virtual_authenticator(context, page)
    user_with_email(page, stack, username)
    enrol_passkey(page, stack)
    page.click("#logout")
    log_in(page, stack, username)
    page.click(".use-passkey")
    page.click("#passkey-button")
    expect(page.locator("#session-info")).to_contain_text("(Passkey)")
    turn_off(page, "passkey")
    page.click("#passkey-button")
    # The session it opened ended with it: a clear word, then the other method.
    expect(page.get_by_role("status")).to_have_text(
        "Passkey is turned off. You had logged in with it, so confirm it's you with "
        "another method to go on.")
    expect(page.locator("#use-email")).to_be_visible()
    shot("turned-off-then-asked")
