""""Remember this browser" in Chromium: tick it on the code page, come back without a
code, see the browser under "Remembered browsers", forget it (a code is asked again), and
a change to the sign-in methods forgetting every remembered browser. The backoffice still
asks for a code on a remembered browser (its own policy, from CheckSession)."""

from __future__ import annotations

import time

from playwright.sync_api import Page, expect

from tests.system.browser.conftest import Shots
from tests.system.browser.flows import (
    enrol_phone,
    log_in,
    pass_2fa_by_email,
    submit_code,
    unique_phone,
    user_with_email,
)
from tests.system.browser.stack import Stack

DAY = 24 * 3600


def log_in_again(page: Page, stack: Stack, username: str) -> None:
    page.click("#logout")
    log_in(page, stack, username)


def pass_2fa_and_remember(page: Page, stack: Stack, address: str) -> None:
    """On the method choice page: email a code, tick "Remember this browser", type it."""
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    before = stack.last_id()
    page.click("#use-email")
    expect(page.locator("label.check")).to_contain_text("Remember this browser for 30 days")
    page.check("#remember")
    submit_code(page, stack.code_for(address, before))


def test_remember_come_back_forget_and_a_new_method_forgets_all(
        page: Page, stack: Stack, username: str, shot: Shots) -> None:
    address, _ = user_with_email(page, stack, username)
    expect(page.locator("#no-devices")).to_be_visible()
    log_in_again(page, stack, username)
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    before = stack.last_id()
    page.click("#use-email")
    shot("remember-checkbox")
    page.check("#remember")
    submit_code(page, stack.code_for(address, before))
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")
    # The token is in a cookie of its own that no script can read, that other sites
    # cannot make the browser send with a POST, and that lives as long as the device.
    [cookie] = [c for c in page.context.cookies() if c["name"].startswith("demo_device_")]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    assert 29 * DAY < cookie["expires"] - time.time() <= 30 * DAY
    assert page.evaluate("document.cookie").find("demo_device_") == -1
    rows = page.locator("#devices tr.device")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("This browser")
    expect(rows.first).to_contain_text("Chrome")
    shot("remembered-browsers")

    # Come back: the password, and no code.
    messages = stack.last_id()
    log_in_again(page, stack, username)
    expect(page.locator("h1")).to_have_text(f"Profile of {username}")
    expect(page.locator("#session-info")).to_contain_text("This browser is remembered")
    assert stack.last_id() == messages  # no code was sent
    shot("back-without-a-code")

    # The backoffice asks for a code all the same.
    page.goto(f"{stack.backoffice}/")
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    expect(page.get_by_role("status")).to_contain_text("confirm it's you")
    page.goto(f"{stack.portal}/profile")

    # A recovery code never remembers a browser: the page does not offer it.
    page.goto(f"{stack.portal}/2fa?n=step-up")
    page.click("#use-recovery")
    expect(page.locator("#code")).to_be_visible()
    expect(page.locator("#remember")).to_have_count(0)
    page.goto(f"{stack.portal}/profile")

    # Forget it: this browser was logged in by being remembered, so it asks for a code.
    page.locator(".forget-device").first.click()
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    expect(page.get_by_role("status")).to_contain_text("This browser is forgotten")
    shot("forgotten")
    pass_2fa_by_email(page, stack, address)
    expect(page.locator("#no-devices")).to_be_visible()
    log_in_again(page, stack, username)
    expect(page.locator("h1")).to_have_text("Two-factor authentication")  # a code again

    # Remember it again, then turn on a phone: every remembered browser is forgotten.
    pass_2fa_and_remember(page, stack, address)
    expect(page.locator("#devices tr.device")).to_have_count(1)
    enrol_phone(page, stack, unique_phone())
    page.goto(f"{stack.portal}/profile")
    expect(page.locator("#no-devices")).to_be_visible()
    shot("new-method-forgot-them")
    log_in_again(page, stack, username)
    expect(page.locator("h1")).to_have_text("Two-factor authentication")
    pass_2fa_by_email(page, stack, address)
    page.goto(f"{stack.portal}/profile/activity")
    activity = page.locator("main")
    expect(activity).to_contain_text("Remembered browsers were forgotten: your sign-in "
                                     "methods changed")
    expect(activity).to_contain_text("A remembered browser was forgotten")
    expect(activity).to_contain_text("Logged in on a remembered browser, without a code")
    shot("activity")
