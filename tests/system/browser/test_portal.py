"""The reference portal and backoffice in a real browser (Chromium through Playwright):
what a user sees when turning factors on and off, logging in, and crossing to the
backoffice. Each test uses a fresh demo account, so the order does not matter."""

from __future__ import annotations

import re

from playwright.sync_api import BrowserContext, Page, expect

from tests.system.browser.conftest import Shots
from tests.system.browser.flows import (
    enrol_app,
    enrol_email,
    enrol_phone,
    factor_row,
    finish_first_factor,
    log_in,
    new_user,
    next_step_code,
    pass_2fa_by_email,
    submit_code,
    turn_off,
    unique_phone,
    user_with_email,
)
from tests.system.browser.stack import Stack


def wrong(code: str) -> str:
    """A well-formed code that is certainly not ``code``."""
    return f"{(int(code) + 1) % 10**6:06d}"


def test_wrong_password_is_refused(page: Page, stack: Stack, username: str,
                                   shot: Shots) -> None:
    page.goto(f"{stack.portal}/login")
    page.fill("#username", "alice")
    page.fill("#password", "not the password")
    page.click("#login")
    expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
    # Logged out: the header offers nothing that needs a login.
    expect(page.locator("header a")).to_have_count(0)
    expect(page.locator("header")).to_contain_text("Demo Portal")
    shot("refused")


def test_enrol_email_shows_recovery_codes_once_then_no_second_prompt(
        page: Page, stack: Stack, username: str, shot: Shots) -> None:
    new_user(page, stack, username)
    shot("profile-without-2fa")
    enrol_email(page, stack, username)
    expect(page.locator("h1")).to_have_text("Email is turned on")
    codes = page.locator(".recovery-code").all_inner_texts()
    assert len(codes) == 10 and len(set(codes)) == 10
    shot("recovery-codes")
    before = stack.last_id()
    finish_first_factor(page)
    # Confirming the first factor proved it: the profile opens without a second prompt,
    # and no other code was sent.
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")
    expect(page.get_by_role("status")).to_have_text("Email is turned on.")
    # A real 2FA session (open_session), which the backoffice honours too.
    expect(page.locator("#session-info")).to_contain_text("2FA passed on the portal")
    assert stack.last_id() == before
    shot("profile-after-first-factor")
    # The backoffice honours that session: it opens without asking (one login, both apps).
    page.click("#to-backoffice")
    expect(page.locator("#sso")).to_contain_text("2FA passed on the portal")
    assert stack.last_id() == before  # still no code sent
    page.goto(f"{stack.portal}/profile")
    row = factor_row(page, "email")
    expect(row).to_contain_text("@example.com")
    expect(row).to_contain_text("On")
    expect(page.locator("#recovery-left")).to_contain_text("10")
    shot("profile-with-email")


def test_login_with_email(page: Page, stack: Stack, username: str, shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    page.click("#logout")
    expect(page.get_by_role("status")).to_have_text("You are logged out.")
    log_in(page, stack, username)
    shot("choose-method")
    before = stack.last_id()
    page.click("#use-email")
    expect(page.locator("#destination")).to_contain_text("@example.com")
    shot("enter-code")
    submit_code(page, stack.code_for(address, before))
    expect(page.locator("#session-info")).to_contain_text("2FA passed on the portal")
    shot("logged-in")


def test_wrong_code_is_refused_with_attempts_left(page: Page, stack: Stack, username: str,
                                                  shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    page.click("#logout")
    log_in(page, stack, username)
    before = stack.last_id()
    page.click("#use-email")
    code = stack.code_for(address, before)
    submit_code(page, wrong(code))
    expect(page.get_by_role("alert")).to_have_text("That code is not right. 4 attempts left.")
    shot("wrong-code")
    submit_code(page, code)
    expect(page.locator("#session-info")).to_be_visible()


def test_resend_too_soon_says_how_long_to_wait(page: Page, stack: Stack, username: str,
                                               shot: Shots) -> None:
    user_with_email(page, stack, username)
    page.click("#logout")
    log_in(page, stack, username)
    page.click("#use-email")
    page.click("#resend")
    expect(page.get_by_role("alert")).to_have_text(re.compile(
        r"A code was sent moments ago\. Please wait \d+ seconds? before asking for a new one\."))
    shot("cooldown")


def test_enrol_phone_by_sms_and_log_in_with_it(page: Page, stack: Stack, username: str,
                                               shot: Shots) -> None:
    user_with_email(page, stack, username)
    number = unique_phone()
    enrol_phone(page, stack, number, "sms")
    expect(page.get_by_role("status")).to_have_text("Phone is turned on.")
    expect(factor_row(page, "phone")).to_contain_text(number[-2:])
    shot("phone-on")
    page.click("#logout")
    log_in(page, stack, username)
    before = stack.last_id()
    page.click("#use-phone-sms")
    expect(page.locator("main")).to_contain_text("by text message")
    shot("sms-sent")
    submit_code(page, stack.code_for(number, before, channel="sms"))
    expect(page.locator("#session-info")).to_contain_text("(Phone)")


def test_enrol_phone_by_voice_and_log_in_by_voice_call(page: Page, stack: Stack,
                                                       username: str, shot: Shots) -> None:
    user_with_email(page, stack, username)
    number = unique_phone()
    enrol_phone(page, stack, number, "voice")
    expect(factor_row(page, "phone")).to_contain_text("On")
    page.click("#logout")
    log_in(page, stack, username)
    before = stack.last_id()
    page.click("#use-phone-voice")
    expect(page.locator("main")).to_contain_text("by voice call")
    shot("call-placed")
    submit_code(page, stack.code_for(number, before, channel="voice"))
    expect(page.locator("#session-info")).to_contain_text("(Phone)")


def test_enrol_authenticator_app_with_qr_code_and_log_in(page: Page, stack: Stack,
                                                         username: str, shot: Shots) -> None:
    new_user(page, stack, username)
    _, totp = enrol_app(page, stack)
    expect(page.locator("#qr")).to_have_attribute("src", re.compile(r"^data:image/"))
    shot("qr-code")
    submit_code(page, totp.now())
    expect(page.locator("h1")).to_have_text("Authenticator app is turned on")
    finish_first_factor(page)
    expect(page.get_by_role("status")).to_have_text("Authenticator app is turned on.")
    page.click("#logout")
    log_in(page, stack, username)
    page.click("#use-app")
    shot("app-code")
    submit_code(page, next_step_code(totp))  # the enrolment used this step's code
    expect(page.locator("#session-info")).to_contain_text("(Authenticator app)")
    expect(factor_row(page, "app")).to_contain_text("On")
    shot("profile-with-app")


def test_log_in_with_a_recovery_code(page: Page, stack: Stack, username: str,
                                     shot: Shots) -> None:
    _, codes = user_with_email(page, stack, username)
    page.click("#logout")
    log_in(page, stack, username)
    page.click("#use-recovery")
    shot("recovery")
    submit_code(page, codes[0])
    expect(page.locator("#session-info")).to_contain_text("(Recovery code)")
    expect(page.locator("#recovery-left")).to_contain_text("9")


def test_backoffice_honours_the_portal_2fa_without_asking_again(
        page: Page, stack: Stack, username: str, shot: Shots) -> None:
    user_with_email(page, stack, username)
    page.click("#to-backoffice")
    expect(page).to_have_url(f"{stack.backoffice}/")
    expect(page.locator("#sso")).to_contain_text("2FA passed on the portal at")
    expect(page.locator("h1")).to_have_text(f"Welcome to the backoffice, {username}")
    shot("backoffice")


def test_backoffice_sends_to_the_portal_login_and_back(page: Page, stack: Stack,
                                                       username: str, shot: Shots) -> None:
    user_with_email(page, stack, username)
    page.context.clear_cookies()
    page.goto(f"{stack.backoffice}/")
    expect(page).to_have_url(re.compile(re.escape(f"{stack.portal}/login?next=")))
    shot("portal-login")
    log_in(page, stack, username)
    pass_2fa_by_email(page, stack, f"{username}@example.com")
    expect(page).to_have_url(f"{stack.backoffice}/")
    expect(page.locator("#sso")).to_be_visible()
    shot("back-in-backoffice")


def _asked_to_log_in(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.portal}/profile")
    expect(page).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))
    page.goto(f"{stack.backoffice}/")
    expect(page).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))


def test_logout_on_the_portal_asks_again_on_both(page: Page, stack: Stack, username: str,
                                                 shot: Shots) -> None:
    user_with_email(page, stack, username)
    page.goto(f"{stack.backoffice}/")
    expect(page.locator("#sso")).to_be_visible()
    page.goto(f"{stack.portal}/profile")
    page.click("#logout")
    shot("logged-out")
    _asked_to_log_in(page, stack)


def test_logout_on_the_backoffice_ends_the_session_everywhere(
        page: Page, context: BrowserContext, stack: Stack, username: str,
        shot: Shots) -> None:
    user_with_email(page, stack, username)
    token_cookie = next(c for c in context.cookies() if c["name"] == "demo_login")
    page.goto(f"{stack.backoffice}/")
    page.click("#logout")
    expect(page.get_by_role("status")).to_have_text("You are logged out.")
    shot("logged-out")
    _asked_to_log_in(page, stack)
    # Even the old cookie, replayed, no longer opens either app: the server-side session
    # it named is deleted (and the 2FA session in it revoked), so both ask for the login.
    context.clear_cookies()
    context.add_cookies([{"name": token_cookie["name"], "value": token_cookie["value"],
                          "domain": token_cookie["domain"], "path": token_cookie["path"]}])
    page.goto(f"{stack.backoffice}/")
    expect(page).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))
    page.goto(f"{stack.portal}/profile")
    expect(page).to_have_url(re.compile(re.escape(f"{stack.portal}/login")))


def test_turning_off_email_needs_an_email_code(page: Page, stack: Stack, username: str,
                                               shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    before = stack.last_id()
    turn_off(page, "email")
    expect(page.locator("h1")).to_have_text("Turn off email")
    code = stack.code_for(address, before)
    submit_code(page, wrong(code))
    expect(page.get_by_role("alert")).to_contain_text("That code is not right.")
    shot("wrong-code-refused")
    page.goto(f"{stack.portal}/profile")
    expect(factor_row(page, "email")).to_contain_text("On")  # still on
    # Back to the open step (a new code now would be refused: 30-s resend cooldown).
    page.goto(f"{stack.portal}/verify")
    submit_code(page, code)
    expect(page.get_by_role("status")).to_have_text("Email is turned off.")
    expect(factor_row(page, "email")).to_have_count(0)
    shot("turned-off")


def test_turning_off_the_app_needs_an_app_code(page: Page, stack: Stack, username: str,
                                               shot: Shots) -> None:
    user_with_email(page, stack, username)
    _, totp = enrol_app(page, stack)
    submit_code(page, totp.now())
    expect(factor_row(page, "app")).to_contain_text("On")
    turn_off(page, "app")
    code = next_step_code(totp)
    submit_code(page, wrong(code))
    expect(page.get_by_role("alert")).to_contain_text("That code is not right.")
    page.goto(f"{stack.portal}/profile")
    expect(factor_row(page, "app")).to_contain_text("On")
    page.goto(f"{stack.portal}/verify")
    submit_code(page, code)
    expect(page.get_by_role("status")).to_have_text("Authenticator app is turned off.")
    expect(factor_row(page, "app")).to_have_count(0)
    expect(factor_row(page, "email")).to_contain_text("On")
    shot("app-off")


def test_changing_the_phone_needs_the_old_number(page: Page, stack: Stack, username: str,
                                                 shot: Shots) -> None:
    user_with_email(page, stack, username)
    old, new = unique_phone(), unique_phone()
    enrol_phone(page, stack, old)
    # A second phone cannot simply be added: the profile offers no "Phone" any more, and
    # the add form (reached by hand) is refused without proof from the old number.
    expect(page.locator("#add-phone")).to_have_count(0)
    page.goto(f"{stack.portal}/profile/add/phone")
    page.fill("#phone_number", new)
    page.click("#start")
    expect(page.get_by_role("alert")).to_contain_text(
        "first confirm a code sent to your current number")
    shot("refused-without-proof")
    page.goto(f"{stack.portal}/profile")
    before = stack.last_id()
    page.click("#change-phone")
    expect(page.locator("h1")).to_have_text("Change phone number")
    page.click("#change-sms")
    expect(page.locator("h1")).to_have_text("Change phone number: confirm your current number")
    old_code = stack.code_for(old, before)
    submit_code(page, wrong(old_code))
    expect(page.get_by_role("alert")).to_contain_text("That code is not right.")
    submit_code(page, old_code)
    expect(page.locator("h1")).to_have_text("Change phone number: the new number")
    shot("old-number-confirmed")
    page.fill("#phone_number", new)
    before = stack.last_id()
    page.click("#start")
    expect(page.locator("h1")).to_have_text("Change phone number: confirm the new number")
    submit_code(page, stack.code_for(new, before))
    expect(page.get_by_role("status")).to_have_text("Your phone number is changed.")
    expect(factor_row(page, "phone")).to_contain_text(new[-2:])
    shot("phone-changed")


def test_inbox_page_shows_the_codes_sent(page: Page, stack: Stack, username: str,
                                         shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    page.goto(f"{stack.portal}/inbox")
    mail = page.locator(f".message[data-to='{address}']").first
    expect(mail).to_contain_text(re.compile(r"\d{6}"))
    shot("inbox")



def test_turning_off_the_phone_needs_a_code_sent_to_it(page: Page, stack: Stack,
                                                      username: str, shot: Shots) -> None:
    user_with_email(page, stack, username)
    number = unique_phone()
    enrol_phone(page, stack, number)
    # One row, two labelled buttons (no unlabelled dropdowns): the way the code goes is
    # chosen on the next page.
    expect(factor_row(page, "phone").locator("select")).to_have_count(0)
    before = stack.last_id()
    turn_off(page, "phone", "#confirm-voice")
    expect(page.locator("main")).to_contain_text("by voice call")
    code = stack.code_for(number, before, channel="voice")
    submit_code(page, wrong(code))
    expect(page.get_by_role("alert")).to_contain_text("That code is not right.")
    submit_code(page, code)
    expect(page.get_by_role("status")).to_have_text("Phone is turned off.")
    expect(factor_row(page, "phone")).to_have_count(0)
    shot("phone-off")
