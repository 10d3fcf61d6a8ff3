"""Headless Chromium driven by selenium: Debian's `chromium` and `chromium-driver` packages
(scripts/install_browser.sh), so the driver always matches the browser and nothing is
downloaded. Used by tests/browser/conftest.py and scripts/screenshots.py."""

from __future__ import annotations

import os

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 800)
PHONE = (390, 844)


def make_driver() -> WebDriver:
    """A headless Chromium; its console is kept (`console_errors`)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: run scripts/install_browser.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--force-device-scale-factor=1", "--lang=en-US", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Service(path): selenium never looks for (or downloads) a driver of its own.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def set_viewport(driver: WebDriver, width: int, height: int) -> None:
    """Make the page's viewport (window.innerWidth x innerHeight) `width` x `height`."""
    driver.set_window_size(width, height)
    inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if (inner_w, inner_h) != (width, height):  # the window counts its frame too
        driver.set_window_size(2 * width - inner_w, 2 * height - inner_h)


def open_at(driver: WebDriver, url: str, width: int, height: int | None = None) -> WebDriver:
    """Open `url` in a viewport `width` wide (and `height` high: 844 at phone widths, else 800)."""
    set_viewport(driver, width, height or (PHONE[1] if width < 720 else DESKTOP[1]))
    driver.get(url)
    return driver


def wait_until(driver: WebDriver, condition, timeout: float = 30, message: str = ""):
    """`condition(driver)`'s first truthy value, polled every 50 ms."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def console_errors(driver: WebDriver) -> list[str]:
    """The page's errors since the last call: uncaught exceptions and console.error, but not
    the browser's own line for each HTTP error status (a 401 is expected in some tests)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
