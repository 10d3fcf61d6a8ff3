"""Screenshots of the built-in pages for docs/screenshots/: the chat page `/` after one exchange
and the engine view `/engine` (when the server has it), at desktop (1280x800) and phone (390x844)
widths, in the headless Chromium of the browser tests (scripts/install_browser.sh first).

    python scripts/screenshots.py [--out docs/screenshots] [--model PATH]

Starts its own server on the embedded model (or --model) on a free port and stops it at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from tests.browser.driver import DESKTOP, PHONE, make_driver, open_at, wait_until  # noqa: E402
from tests.conftest import start_server  # noqa: E402

QUESTION = "Write a Python function that adds two numbers."


def chat(driver, base_url: str, out: Path) -> None:
    open_at(driver, base_url + "/", DESKTOP[0])
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait_until(driver, lambda d: d.find_element(By.ID, "model-name").text not in ("", "\u2026"))
    driver.find_element(By.ID, "settings-toggle").click()
    for field, value in (("system-prompt", "You are a helpful assistant."), ("temperature", "0"),
                         ("max-tokens", "64")):
        driver.find_element(By.ID, field).send_keys(Keys.CONTROL, "a", Keys.NULL, value)
    driver.find_element(By.ID, "prompt").send_keys(QUESTION)
    driver.find_element(By.ID, "send").click()
    wait_until(driver, lambda d: d.execute_script("return document.body.dataset.state") == "idle"
               and d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats span"), 300)
    driver.find_element(By.ID, "settings-toggle").click()  # closed: the conversation in view
    driver.save_screenshot(str(out / "chat-desktop.png"))
    open_at(driver, base_url + "/", PHONE[0])
    wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats span"))
    driver.save_screenshot(str(out / "chat-phone.png"))
    driver.find_element(By.ID, "open-sidebar").click()
    time.sleep(0.5)  # the list slides in
    driver.save_screenshot(str(out / "chat-phone-conversations.png"))


def engine(driver, base_url: str, out: Path) -> None:
    if httpx.get(base_url + "/engine").status_code == 404:
        print("no /engine route on this server: its screenshots are skipped")
        return
    stop = threading.Event()

    def load() -> None:  # something running, for the view to show
        body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 300, "stream": True}
        while not stop.is_set():
            with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=300) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        for name, (width, height) in (("engine-desktop.png", DESKTOP), ("engine-phone.png", PHONE)):
            open_at(driver, base_url + "/engine", width, height)
            time.sleep(3)  # a few updates of the live view
            driver.save_screenshot(str(out / name))
    finally:
        stop.set()
        worker.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--model", help="a model for `pagoda serve --model` (default: the embedded one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server_args = ["--max-model-len", "1024"] + (["--model", args.model] if args.model else [])
    server = start_server(tempfile.mkdtemp(prefix="pagoda-shots-"), *server_args)
    driver = make_driver()
    try:
        chat(driver, server.base_url, args.out)
        engine(driver, server.base_url, args.out)
    finally:
        driver.quit()
        server.stop()
    for png in sorted(args.out.glob("*.png")):
        print(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)


if __name__ == "__main__":
    main()
