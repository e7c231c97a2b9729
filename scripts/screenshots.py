"""Take the README's screenshots (docs/screenshots/*.png) in Chromium, as alice on a fresh
demo stack (the same stack and browser setup as tests/system/browser):

    .venv/bin/python scripts/screenshots.py [OUT_DIR]

The passkey pages need a server with passkeys; without them that shot is left out.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyotp
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.system.browser.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.system.browser.flows import (  # noqa: E402
    finish_first_factor,
    next_step_code,
    submit_code,
    virtual_authenticator,
)
from tests.system.browser.stack import Stack, run_stack  # noqa: E402

USER = "alice"


def tour(page: Page, stack: Stack, out: Path) -> None:
    def shot(name: str, full: bool = True) -> None:
        page.screenshot(path=str(out / f"{name}.png"), full_page=full)
        print("wrote", out / f"{name}.png")

    from portal_backoffice.users import DEMO_PASSWORD

    page.goto(f"{stack.portal}/login")
    shot("01-login")
    page.fill("#username", USER)
    page.fill("#password", DEMO_PASSWORD)
    page.click("#login")
    page.click("#add-app")
    page.click("#start")
    expect(page.locator("#qr")).to_be_visible()
    shot("02-authenticator-app-qr-code")
    totp = pyotp.TOTP(page.locator("#totp-secret").inner_text().strip())
    submit_code(page, totp.now())
    expect(page.locator("#recovery-codes")).to_be_visible()
    finish_first_factor(page)
    # No second prompt right after the first factor; the next login asks.
    page.click("#logout")
    page.fill("#username", USER)
    page.fill("#password", DEMO_PASSWORD)
    page.click("#login")
    expect(page.locator("#use-app")).to_be_visible()
    shot("03-two-factor-step")
    page.click("#use-app")
    submit_code(page, next_step_code(totp))
    expect(page.locator("#session-info")).to_be_visible()
    page.click("#add-passkey")
    page.fill("#label", "Work laptop")
    page.click("#start")
    page.locator("#passkey-button, [role=alert]:not([hidden])").first.wait_for()
    if page.locator("#passkey-button").count():
        shot("04-passkey-enrolment")
        page.click("#passkey-button")
        expect(page.get_by_role("status")).to_be_visible()
    else:
        print("no passkeys on this server: 04-passkey-enrolment left out")
    page.goto(f"{stack.portal}/profile")
    shot("05-profile")
    page.locator(".disable-passkey").first.click()
    expect(page.locator("#use-recovery-code")).to_be_visible()
    shot("07-turn-off-or-use-a-recovery-code")
    page.goto(f"{stack.portal}/profile/recovery-codes")
    shot("08-new-recovery-codes-proof")
    page.goto(f"{stack.portal}/profile/sessions")
    shot("09-your-sessions")
    page.goto(f"{stack.portal}/profile/activity")
    shot("10-security-activity")
    page.goto(f"{stack.portal}/profile")
    page.click("#to-backoffice")
    expect(page.locator("#sso")).to_be_visible()
    shot("06-backoffice-without-second-2fa")


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stacks = run_stack(Path(tmp))
        stack = next(stacks)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                            args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1000, "height": 700})
                page = context.new_page()
                virtual_authenticator(context, page)
                tour(page, stack, out)
                browser.close()
        finally:
            stacks.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
