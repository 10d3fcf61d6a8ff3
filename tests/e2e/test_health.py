"""/health from the outside, as a probe or a client that waits for it sees it."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import free_port


def test_a_request_sent_the_moment_health_says_200_is_served(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--port", str(port), "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        codes = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                health = httpx.get(base + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            codes.append(health.status_code)
            if health.status_code == 200:
                break
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            time.sleep(0.05)
        body = {"model": EMBEDDED_MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        resp = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert codes[-1] == 200 and 503 in codes  # it was unavailable before, then at once served
        assert any(t["serving"] for t in health.json()["tokenizers"].values())
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
