"""Adding a factor once one is ACTIVE needs a recent 2FA session: the portal sends the user
through the 2FA step again and brings them back to what they were doing.

mfa-service's window is 10 minutes; to see it without waiting, this module runs a stack of
its own whose portal renews sessions older than 3 seconds (``--step-up-max-age``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.system.browser.conftest import Shots, need_browser
from tests.system.browser.flows import (
    factor_row,
    pass_2fa_by_email,
    submit_code,
    unique_phone,
    user_with_email,
)
from tests.system.browser.stack import Stack, run_stack

MAX_AGE = 3.0


@pytest.fixture(scope="module")
def short_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_browser()
    yield from run_stack(tmp_path_factory.mktemp("demo-step-up"),
                         "--step-up-max-age", str(MAX_AGE))


def test_adding_a_factor_with_an_old_session_asks_for_2fa_and_comes_back(
        page: Page, short_stack: Stack, username: str, shot: Shots) -> None:
    stack = short_stack
    address, _ = user_with_email(page, stack, username)
    time.sleep(MAX_AGE + 0.5)  # the session passes the portal's (shortened) step-up age
    page.click("#add-phone")
    expect(page.get_by_role("status")).to_have_text(
        "For your security, confirm it's you with two-factor authentication first.")
    shot("2fa-again")
    pass_2fa_by_email(page, stack, address)
    # Back on the form the user asked for, with a fresh session.
    expect(page.locator("h1")).to_have_text("Turn on phone")
    number = unique_phone()
    page.fill("#phone_number", number)
    before = stack.last_id()
    page.click("#start")
    submit_code(page, stack.code_for(number, before))
    expect(factor_row(page, "phone")).to_contain_text("On")
    shot("phone-added")
