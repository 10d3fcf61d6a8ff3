"""The browser for tests/browser/: one headless Chromium for the session (tests/browser/driver.py).

Each test opens its page with `open_at(browser, url, width)`, which also sets the viewport.
"""

from __future__ import annotations

import pytest

from tests.browser.driver import console_errors, make_driver


@pytest.fixture(scope="session")
def browser():
    driver = make_driver()
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def _no_page_errors(request):
    """A test that used the browser fails on any script error the page logged meanwhile."""
    driver = request.getfixturevalue("browser") if "browser" in request.fixturenames else None
    if driver is not None:
        console_errors(driver)  # what earlier tests left
    yield
    if driver is not None:
        errors = console_errors(driver)
        # Leave no page open: /engine keeps a watch on the scheduler and redraws 4 times a second,
        # which would cost the rest of the suite CPU until the session ends.
        driver.get("about:blank")
        assert errors == []
