"""No request can hurt the others: a body larger than any prompt the model could take is refused
at once, before any parsing or tokenizing, while the streams around it go on undisturbed (on the
session's server, tests/conftest.py: the refusal leaves it as it was)."""

from __future__ import annotations

import asyncio
import time

import httpx

from protocol import EMBEDDED_MODEL_NAME
from tests.e2e.streams import run_streams


def test_a_20_mb_prompt_is_refused_within_a_second_and_the_streams_beside_it_go_on(server):
    expected, _ = asyncio.run(run_streams(server))
    answers: list[tuple[httpx.Response, float]] = []

    async def huge_prompt() -> None:
        body = {"model": EMBEDDED_MODEL_NAME, "prompt": "pagoda " * (20 * 2**20 // 7), "max_tokens": 4}
        async with httpx.AsyncClient(timeout=30) as http:
            began = time.monotonic()
            resp = await http.post(server.base_url + "/v1/completions", json=body)
            answers.append((resp, time.monotonic() - began))

    texts, _ = asyncio.run(run_streams(server, huge_prompt))
    [(resp, took)] = answers
    print(f"\na 20 MB prompt was answered {resp.status_code} in {took:.2f} s")
    assert resp.status_code == 413 and took < 1.0
    error = resp.json()["error"]
    assert error["code"] == "request_too_large" and "bytes" in error["message"]
    assert texts == expected
    health = httpx.get(server.base_url + "/health").json()
    assert len(health["tokenizers"]) == 2  # no tokenizer was declared dead meanwhile
