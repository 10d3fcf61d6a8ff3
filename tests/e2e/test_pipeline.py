"""The whole pipeline, end to end: real processes on loopback, the official openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import child_pids, start_server

MODEL = EMBEDDED_MODEL_NAME


def chat(client: openai.OpenAI, content: str, **kw) -> openai.types.chat.ChatCompletion:
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 32)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_capital_of_france_is_paris(client):
    resp = chat(client, "What is the capital of France?")
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_deltas_concatenate_to_the_non_streamed_text(client):
    question = "Write a short poem about the sea."
    full = chat(client, question, max_tokens=48).choices[0].message.content
    chunks = list(chat(client, question, max_tokens=48, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 5, "the answer must arrive in many chunks"
    assert "".join(deltas) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full and full


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_16_concurrent_requests_equal_their_texts_alone_and_share_steps(server, client):
    prompts = [f"Tell me one fact about the number {i}." for i in range(16)]
    alone = [chat(client, p, max_tokens=24).choices[0].message.content for p in prompts]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        resps = await asyncio.gather(*(
            aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0)
            for p in prompts))
        await aclient.close()
        return [r.choices[0].message.content for r in resps]

    since = time.time()
    assert asyncio.run(together()) == alone
    shared = max(len(s["requests"]) for s in server.steps() if s["time"] >= since)
    assert shared >= 8, f"the concurrent requests should share steps; the widest step had {shared}"


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, client):
    url = server.base_url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    _error(r)

    r = httpx.post(url, json={"model": "no-such-model", "messages": msgs})
    assert r.status_code == 404
    assert "no-such-model" in _error(r)["message"]

    r = httpx.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": -1})
    assert r.status_code == 400
    assert "max_tokens" in _error(r)["message"]

    long_prompt = "hello " * 1100
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}, timeout=60)
    assert r.status_code == 400
    assert "1024" in _error(r)["message"]

    with pytest.raises(openai.NotFoundError):
        chat(client, "hi", model="gpt-17")
    assert "Paris" in chat(client, "What is the capital of France?").choices[0].message.content


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_each_role_is_its_own_process_and_sigterm_leaves_none(tmp_path):
    srv = start_server(str(tmp_path), "--num-tokenizers", "2")
    try:
        kids = child_pids(srv.proc.pid)
        roles = sorted(_cmdline(p).split("-m pagoda ")[1].split()[0] for p in kids)
        assert roles == ["frontend", "scheduler", "tokenizer", "tokenizer", "worker"]
        assert len(set(kids)) == 5 and srv.proc.pid not in kids
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(15)
        deadline = time.monotonic() + 15
        while any(os.path.exists(f"/proc/{p}") for p in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in kids if os.path.exists(f"/proc/{p}")]
    finally:
        srv.stop()
