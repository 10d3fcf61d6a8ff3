"""The engine view at `/engine` in headless Chromium, against the real server on the embedded model:
while a load runs, the page's running count and KV grid follow it, and go back when it ends."""

from __future__ import annotations

import asyncio
import threading

import pytest
from selenium.webdriver.common.by import By

from tests.browser.driver import DESKTOP, open_at, wait_until
from tests.e2e.streams import run_streams

pytestmark = pytest.mark.slow


def shown(browser) -> dict:
    """What the page shows now, from the data attributes it keeps for tests."""
    return browser.execute_script("""
        const kv = document.getElementById('kv');
        const grid = kv.querySelector('canvas');
        return {
          status: document.getElementById('status').dataset.status,
          running: Number(document.getElementById('running').dataset.running),
          used: Number(kv.dataset.kvUsed), cached: Number(kv.dataset.kvCached), blocks: Number(kv.dataset.kvBlocks),
          steps: Number(document.getElementById('steps-chart').dataset.steps),
          grid: grid ? grid.toDataURL() : null,
          tokenizers: [...document.querySelectorAll('#tokenizers tbody tr')].map(r => r.dataset.state),
          groups: [...document.querySelectorAll('#groups tbody tr')].map(r => r.dataset.state),
          drafts_hidden: document.getElementById('drafts-box').hidden,
        };""")


def test_the_engine_page_follows_a_load_and_its_kv_blocks(browser, server):
    open_at(browser, server.base_url + "/engine", DESKTOP[0])
    idle = wait_until(browser, lambda d: (s := shown(d))["status"] == "live" and s["blocks"] > 0 and s, 60,
                      "the page never drew the scheduler's view")
    assert idle["running"] == 0 and idle["used"] == 0
    assert idle["tokenizers"] == ["up", "up"] and idle["groups"] == ["serving"] and idle["drafts_hidden"]

    load = threading.Thread(target=lambda: asyncio.run(run_streams(server)))
    load.start()
    busy = wait_until(browser, lambda d: (s := shown(d))["running"] > 0 and s["used"] > 0 and s, 120,
                      "the page never showed the load running")
    load.join(300)
    assert not load.is_alive()
    after = wait_until(browser, lambda d: (s := shown(d))["running"] == 0 and s["used"] == 0 and s, 30,
                       "the page never showed the load finished")
    assert after["cached"] > 0 and after["steps"] > 0  # its prompts' blocks stay cached; steps were drawn
    assert busy["grid"] != idle["grid"] and after["grid"] != busy["grid"]  # the grid was redrawn both times
    assert browser.find_element(By.ID, "tok-s").text not in ("", "\u2013")
