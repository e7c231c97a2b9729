"""Browser tests: Playwright for Python driving Debian's Chromium (never a downloaded
browser) against the demo stack started once per session on free ports of localhost.

Chromium is /usr/bin/chromium (``scripts/test`` installs it as root when missing). Without
it the browser tests are skipped locally and fail under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.config import IN_CI, REPO
from tests.system.browser.stack import Stack, run_stack

CHROMIUM = Path(os.environ.get("MFA_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "browser"
# Without the background-networking flags Chromium's own connections (updates, sync,
# field trials) are refused by the closed network and slow every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]


def need_browser() -> None:
    problem = None
    if sync_playwright is None:
        problem = "playwright is not installed (pip install -e '.[test]')"
    elif not CHROMIUM.exists():
        problem = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if IN_CI:
            pytest.fail(problem + " (CI=true: a missing browser is a failure)")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_browser()
    yield from run_stack(tmp_path_factory.mktemp("demo"))


# Module scope, not session: between its calls the sync API leaves its event loop marked
# as running in this thread, so pytest-asyncio's tests in other modules could not run
# while it is alive.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    need_browser()
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile per test: its own cookies, no login."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(10_000)
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@dataclass
class Shots:
    """Screenshots of a test's steps: test-artifacts/browser/<test>/NN-step.png."""

    page: Page
    folder: Path
    taken: list[Path] = field(default_factory=list)

    def __call__(self, step: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.taken) + 1:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path


@pytest.fixture
def shot(page: Page, request: pytest.FixtureRequest) -> Shots:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder = ARTIFACTS / name
    for old in folder.glob("*.png"):
        old.unlink()
    return Shots(page, folder)


@pytest.fixture
def username() -> str:
    return f"u{uuid.uuid4().hex[:10]}"
