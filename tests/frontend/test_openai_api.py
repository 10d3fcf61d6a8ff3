"""The OpenAI API as a vLLM user meets it: every sampling parameter, logprobs, echo, stop strings,
streaming, errors, disconnects, /metrics and the tokenizer pool, through the official SDK against
the real processes.

Most tests share the session `server`; the pool tests share one more (4 tokenizers, an API key
from PAGODA_API_KEY, a short queue, a --chat-template file).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from typing import NamedTuple

import httpx
import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME, EngineConfig
from tests.conftest import child_pids, start_server

MODEL = EMBEDDED_MODEL_NAME
PROMPT = "The capital of France is"
QUICK_EOS = "Reply with one word: yes or no?"  # the model answers in a few tokens, then EOS


def complete(client: openai.OpenAI, prompt: str | list[int] = PROMPT, **kw) -> openai.types.Completion:
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.completions.create(prompt=prompt, **kw)


def chat(client: openai.OpenAI, content: str, **kw) -> openai.types.chat.ChatCompletion:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizer_svc.tokenizer_loader import load_tokenizer

    return load_tokenizer(EngineConfig())


class Generated(NamedTuple):
    text: str
    ids: list[int]
    tokens: list[str]  # each token decoded alone


def generate(client: openai.OpenAI, tokenizer, prompt: str | list[int] = PROMPT, **kw) -> Generated:
    """A completion with its token ids, through vLLM's return_tokens_as_token_ids."""
    extra_body = {**kw.pop("extra_body", {}), "return_tokens_as_token_ids": True}
    choice = complete(client, prompt, logprobs=0, extra_body=extra_body, **kw).choices[0]
    assert choice.logprobs is not None
    ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return Generated(choice.text, ids, [tokenizer.decode([i]) for i in ids])


@pytest.fixture(scope="module")
def greedy(server, tokenizer) -> Generated:
    """The greedy 12 tokens after PROMPT, which many tests compare with."""
    sdk = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    out = generate(sdk, tokenizer)
    assert "".join(out.tokens) == out.text and len(out.ids) == 12
    return out


def metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of a /metrics sample over the series whose labels include `labels` (the key
    goes along: the pool's server requires it on /metrics too; the others ignore it)."""
    total = 0.0
    for line in httpx.get(base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        m = re.fullmatch(r"([\w:]+)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# ---- sampling ------------------------------------------------------------------------------


def test_greedy_equals_top_k_1(client, greedy):
    assert complete(client, temperature=1.0, extra_body={"top_k": 1}).choices[0].text == greedy.text


def test_seed_temperature_top_p_and_min_p(client, greedy):
    first6 = "".join(greedy.tokens[:6])
    seeded = [complete(client, temperature=1.0, seed=s, max_tokens=6).choices[0].text for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]
    assert complete(client, temperature=1.0, top_p=0.001, seed=3, max_tokens=6).choices[0].text == first6
    assert complete(client, temperature=1.0, seed=3, max_tokens=6, extra_body={"min_p": 1.0}).choices[0].text == first6


def test_penalties_make_the_output_less_repetitive(client, tokenizer):
    def repeats(**kw) -> int:
        ids = generate(client, tokenizer, "one one one one one one one one", max_tokens=10, **kw).ids
        return len(ids) - len(set(ids))

    base = repeats()
    assert repeats(frequency_penalty=2.0) < base
    assert repeats(presence_penalty=2.0) < base
    assert repeats(extra_body={"repetition_penalty": 1.5}) < base


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(server, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=42)
    alone = client.completions.create(**kw).choices[0].text

    async def in_batch() -> str:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        others = [
            aclient.completions.create(model=MODEL, prompt=f"Fact number {i}:", max_tokens=8, temperature=1.0)
            for i in range(8)
        ]
        results = await asyncio.gather(aclient.completions.create(**kw), *others)
        await aclient.close()
        return results[0].choices[0].text

    assert asyncio.run(in_batch()) == alone


def test_n_3_gives_3_choices(client):
    """Needs the scheduler's parallel sampling (n samples sent back under one id with their index)."""
    kw = dict(n=3, temperature=1.0, seed=5, max_tokens=6, extra_body={"ignore_eos": True})
    resp = chat(client, "Name a color.", **kw)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) > 1
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 18

    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in chat(client, "Name a color.", stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.message.content for c in resp.choices] and finishes == ["length"] * 3


def test_max_tokens_min_tokens_and_ignore_eos(client):
    short = chat(client, QUICK_EOS, max_tokens=20)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 10
    resp = chat(client, QUICK_EOS, max_completion_tokens=n + 2, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == n + 2 and resp.choices[0].finish_reason == "length"
    resp = chat(client, QUICK_EOS, max_tokens=20, extra_body={"min_tokens": n + 2})
    assert resp.usage.completion_tokens >= n + 2


def test_stop_token_ids_end_the_text_before_that_token(client, greedy):
    stop_id = greedy.ids[3]
    first = greedy.ids.index(stop_id)
    resp = complete(client, extra_body={"stop_token_ids": [stop_id]})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop_id
    assert choice.text == "".join(greedy.tokens[:first]) and resp.usage.completion_tokens == first + 1


def test_stop_string_spanning_two_tokens_is_trimmed(client, greedy):
    text, tokens = greedy.text, greedy.tokens
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # Two characters from each side of a token boundary, found nowhere earlier in the text.
    stop, at = next(
        (s, offsets[i + 1] - 2)
        for i in range(len(tokens) - 1)
        if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2
        for s in [tokens[i][-2:] + tokens[i + 1][:2]]
        if text.find(s) == offsets[i + 1] - 2
    )
    resp = complete(client, stop=[stop, "never appears"]).choices[0]
    assert (resp.text, resp.finish_reason, resp.model_extra["stop_reason"]) == (text[:at], "stop", stop)
    streamed = complete(client, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:at]
    kept = complete(client, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: at + len(stop)]


def test_logprobs_of_the_greedy_token_are_the_max_of_top_logprobs(client):
    content = chat(client, "Hello!", logprobs=True, top_logprobs=5, max_tokens=6).choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs) == entry.top_logprobs[0].logprob
        assert entry.token == entry.top_logprobs[0].token and entry.bytes == list(entry.token.encode())
    lp = complete(client, logprobs=3, max_tokens=6).choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value == max(top.values()) == top[token] and value <= 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert chat(client, "Hello!", max_tokens=1).choices[0].logprobs is None


def test_echo_returns_the_prompt(client, greedy):
    assert complete(client, echo=True).choices[0].text == PROMPT + greedy.text
    echoed = complete(client, greedy.ids[:6], echo=True, max_tokens=1).choices[0].text
    assert echoed.startswith("".join(greedy.tokens[:6])) and len(echoed) > len("".join(greedy.tokens[:6]))


def test_logit_bias_bans_and_forces_tokens(client, tokenizer, greedy):
    banned = generate(client, tokenizer, max_tokens=2, logit_bias={str(greedy.ids[0]): -100})
    assert banned.ids[0] != greedy.ids[0]
    assert generate(client, tokenizer, max_tokens=2, logit_bias={"1000": 100}).ids == [1000, 1000]


# ---- chat templates ----------------------------------------------------------------------


def test_chat_turns_and_continue_final_message_use_the_models_template(client, tokenizer):
    tok = tokenizer
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of France?"},
    ]
    resp = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=8, temperature=0)
    expected = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))

    partial = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "The capital is"}]
    resp = client.chat.completions.create(
        model=MODEL, messages=partial, max_tokens=4, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    expected = tok.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    assert expected.endswith("The capital is")
    assert resp.usage.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))
    assert "Paris" in resp.choices[0].message.content


# ---- streaming -----------------------------------------------------------------------------


def test_streamed_emoji_and_cjk_are_byte_identical_and_never_split(server, client):
    kw = dict(model=MODEL, prompt="Emoji and Chinese: 🌍 你好 🌍 你好 🌍", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert re.search("[\u4e00-\u9fff]", full) and re.search("[\U0001f300-\U0001faff]", full)
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**kw, "stream": True}, timeout=120) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    raw = [e.encode() for e in events]
    texts = [json.loads(b[len("data: "):].decode("utf-8", errors="strict"))["choices"][0]["text"] for b in raw]
    assert "".join(texts).encode() == full.encode()
    assert not any("\ufffd" in t for t in texts)


def test_usage_in_the_last_chunk_only_when_asked(client):
    whole = complete(client, max_tokens=3)
    chunks = list(complete(client, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in complete(client, max_tokens=3, stream=True))


# ---- errors and disconnects ----------------------------------------------------------------


def openai_error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return caught.value.status_code, body["error"]


def test_every_error_is_answered_in_openai_shape_and_the_server_keeps_serving(client):
    cases = [
        (lambda: complete(client, temperature=3), 400, "temperature", "between 0 and 2"),
        (lambda: complete(client, n=0), 400, "n", "between 1 and 128"),
        (lambda: complete(client, logprobs=21), 400, "logprobs", "between 0 and 20"),
        (lambda: complete(client, stop=[str(i) for i in range(17)]), 400, "stop", "at most 16"),
        (lambda: complete(client, logit_bias={"10000000": 5}), 400, "logit_bias", "token ids in [0,"),
        (lambda: complete(client, model="gpt-4"), 404, "model", "does not exist"),
        (lambda: complete(client, prompt="hi " * 1100), 400, "prompt", "maximum context length is 1024"),
        (lambda: complete(client, max_tokens=2000), 400, "max_tokens", "maximum context length is 1024"),
    ]
    for call, status, param, words in cases:
        got_status, error = openai_error(call)
        assert (got_status, error["param"]) == (status, param), error
        assert words in error["message"], error
    assert complete(client, max_tokens=2).usage.completion_tokens == 2


def test_200_streams_that_disconnect_at_random_points_free_every_block(server, client):
    rng = random.Random(0)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 32, "stream": True,
                "temperature": 1.0, "ignore_eos": True}
        leave_after = rng.randint(0, 8)
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            if leave_after == 0:
                return
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    leave_after -= 1
                    if leave_after == 0:
                        return  # closing the stream mid-way is the disconnect

    async def crowd() -> list[BaseException | None]:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=300) as http:
            tasks = [asyncio.create_task(one(http, i)) for i in range(200)]
            await asyncio.sleep(0.5)
            for task in rng.sample(tasks, 20):
                task.cancel()  # some leave before even the first byte
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(crowd())
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    deadline = time.monotonic() + 120
    while True:
        figures = [metric(server.base_url, f"pagoda:{m}")
                   for m in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if figures == [0, 0, 0]:
            break
        assert time.monotonic() < deadline, figures
        time.sleep(0.5)
    assert metric(server.base_url, "pagoda:request_success_total", finished_reason="abort") > 0
    assert complete(client, max_tokens=4).choices[0].text == complete(client, max_tokens=4).choices[0].text != ""


# ---- metrics -----------------------------------------------------------------------------


def test_metrics_count_tokens_finishes_and_latencies(server, client):
    names = ("pagoda:prompt_tokens_total", "pagoda:generation_tokens_total", "pagoda:e2e_request_latency_seconds_count",
             "pagoda:time_to_first_token_seconds_count", "pagoda:time_per_output_token_seconds_count")
    before = {n: metric(server.base_url, n) for n in names}
    length_before = metric(server.base_url, "pagoda:request_success_total", finished_reason="length")
    resp = complete(client, max_tokens=5)
    delta = [metric(server.base_url, n) - before[n] for n in names]
    # One output per token: four gaps between five tokens.
    assert delta == [resp.usage.prompt_tokens, 5, 1, 1, 4]
    assert metric(server.base_url, "pagoda:request_success_total", finished_reason="length") == length_before + 1
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total"):
        assert f'pagoda:{name}{{model_name="{MODEL}"}}' in text


# ---- the tokenizer pool, the API key and the queue limit -------------------------------------

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
KEY = "pool-test-key"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    template = tmp / "template.jinja"
    template.write_text(TEMPLATE)
    os.environ["PAGODA_API_KEY"] = KEY  # the env var, not --api-key: both must work
    try:
        srv = start_server(str(tmp), "--max-model-len", "512", "--num-tokenizers", "4", "--max-num-seqs", "8",
                           "--max-num-queued-reqs", "66", "--chat-template", str(template))
    finally:
        del os.environ["PAGODA_API_KEY"]
    yield srv
    srv.stop()


def test_api_key_from_the_environment_is_required(pool):
    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=pool.base_url + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        sdk("wrong").models.list()
    missing = httpx.get(pool.base_url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert [m.id for m in sdk(KEY).models.list().data] == [MODEL]
    assert httpx.get(pool.base_url + "/health").status_code == 200
    assert httpx.get(pool.base_url + "/metrics").status_code == 401
    keyed = httpx.get(pool.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert "pagoda:kv_cache_usage_perc" in keyed.text
    # The key is in no process's command line (`ps` shows those to every user).
    children = child_pids(pool.proc.pid)
    assert len(children) == 7  # scheduler, worker, 4 tokenizers, frontend
    for pid in [pool.proc.pid, *children]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()



def test_chat_template_flag_overrides_the_models(pool, tokenizer):
    sdk = openai.OpenAI(base_url=pool.base_url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    rendered = "<system>Be brief.\n<user>Hi\n<assistant>"
    assert resp.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_64_concurrent_requests_spread_over_all_four_tokenizers(pool):
    async def burst() -> None:
        sdk = openai.AsyncOpenAI(base_url=pool.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        await asyncio.gather(*(sdk.completions.create(model=MODEL, prompt=f"{i}", max_tokens=2) for i in range(64)))
        await sdk.close()

    before = Counter({f"tokenizer-{i}": metric(pool.base_url, "pagoda:tokenizer_requests_total",
                                               tokenizer=f"tokenizer-{i}") for i in range(4)})
    asyncio.run(burst())
    after = Counter({f"tokenizer-{i}": metric(pool.base_url, "pagoda:tokenizer_requests_total",
                                              tokenizer=f"tokenizer-{i}") for i in range(4)})
    spread = after - before
    assert sum(spread.values()) == 64 and len(spread) == 4
    assert min(spread.values()) >= 8, spread


def test_a_full_queue_answers_503_with_retry_after_and_the_server_recovers(pool):
    async def flood() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 4, "ignore_eos": True}
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(base_url=pool.base_url, headers=headers, limits=limits, timeout=300) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(100)))

    responses = asyncio.run(flood())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses[200] >= 66, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert rejected.json()["error"]["type"] == "server_error" and "overloaded" in rejected.json()["error"]["message"]
    sdk = openai.OpenAI(base_url=pool.base_url + "/v1", api_key=KEY, max_retries=0)
    assert sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_models_says_the_context_and_the_loaded_model_and_version_the_package(server):
    sdk = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    (card,) = sdk.models.list().data
    # vLLM's fields beside OpenAI's: the session server runs with --max-model-len 1024.
    assert (card.id, card.owned_by, card.max_model_len, card.root) == (MODEL, "pagoda", 1024, EMBEDDED_MODEL_NAME)
    from importlib.metadata import version

    assert httpx.get(server.base_url + "/version").json() == {"version": version("pagoda")}
