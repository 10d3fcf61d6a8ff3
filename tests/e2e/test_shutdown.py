"""SIGTERM to `pagoda serve`: the running requests finish, new ones get 503 with Retry-After
meanwhile, and the command exits 0 within --shutdown-timeout; what cannot finish in time ends
with a clear error."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import start_server


def completion(max_tokens: int) -> dict:
    return {"model": EMBEDDED_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}


def stream_events(base_url: str, body: dict, first_event: threading.Event, events: list[dict]) -> None:
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                first_event.set()


def text_of(events: list[dict]) -> str:
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def test_sigterm_lets_the_running_request_finish_refuses_new_ones_and_exits_0(tmp_path):
    server = start_server(str(tmp_path), "--max-model-len", "512", "--num-tokenizers", "1")
    try:
        undisturbed: list[dict] = []
        stream_events(server.base_url, completion(48), threading.Event(), undisturbed)
        events: list[dict] = []
        first = threading.Event()
        running = threading.Thread(target=stream_events, args=(server.base_url, completion(48), first, events))
        running.start()
        assert first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        refused = httpx.post(server.base_url + "/v1/completions", json=completion(2), timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(server.base_url + "/health").json()["status"] == "draining"
        running.join(60)
        assert text_of(events) == text_of(undisturbed) and events[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) == 0
        print(f"\nexit 0 {time.monotonic() - signalled:.1f} s after SIGTERM")
    finally:
        server.stop()


def test_a_request_still_running_at_the_shutdown_timeout_ends_with_an_error(tmp_path):
    server = start_server(str(tmp_path), "--max-model-len", "512", "--num-tokenizers", "1",
                          "--shutdown-timeout", "1")
    try:
        events: list[dict] = []
        first = threading.Event()
        running = threading.Thread(target=stream_events, args=(server.base_url, completion(400), first, events))
        running.start()
        assert first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        running.join(30)
        assert not running.is_alive()
        assert "--shutdown-timeout" in events[-1]["error"]["message"]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
