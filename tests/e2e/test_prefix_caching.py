"""Scheduler settings through the whole pipeline: greedy outputs must not depend on them.

The session server (prefix caching on, 2048-token steps, async scheduling) gives the
reference; three more servers run the same requests with prefix caching off and 32-token
steps, with 256-token steps and a KV pool so small that requests are preempted, and with
4096-token steps scheduled one at a time. Prompts are token ids, so their lengths (and so
their blocks) are exact.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME, EngineConfig
from tests.conftest import Server, start_server
from tokenizer_svc.tokenizer_loader import load_tokenizer

MAX_TOKENS = 8
PROMPT_LEN = 60  # 4 blocks of 16, the last one 12 tokens full: each decode crosses a block boundary
PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp and a small "
    "notebook in which he wrote down the ships he saw, the colour of the sea and the direction of the wind.",
    "Bread is made from flour, water, salt and yeast. The yeast eats the sugars in the flour and makes gas, "
    "which fills the dough with small bubbles, so that the loaf rises in a warm place before it is baked.",
    "In the mountains the weather changes quickly. A clear morning can turn into an afternoon of thunder, "
    "and walkers who know the hills always carry a warm coat, some water and a map, even on a sunny day.",
    "The library opened its doors at nine o'clock. Children ran to the picture books, students found quiet "
    "tables near the windows, and an old man sat down with the newspapers as he had done for forty years.",
    "A river begins as a small stream high in the hills. It gathers water from rain and melting snow, grows "
    "wider as other streams join it, and finally reaches the sea after a long journey through the valleys.",
    "The orchestra tuned their instruments while the hall slowly filled. When the conductor raised her hands "
    "the room fell silent, and the first soft notes of the violins rose like morning light over a field.",
]
SHARED_PREFIX = (
    "Here are the rules of the village chess club, which every member agrees to follow. "
    "Games start on time, and a player who is more than fifteen minutes late loses the game. "
    "Mobile phones stay switched off in the playing hall. Members speak quietly and never comment "
    "on a game that is still being played. The club provides boards, pieces and clocks, which must be "
    "put back in their boxes after each evening. New members are welcome at any time of the year and "
    "play their first three games against the club captain, who then places them in a suitable group. "
) * 3


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    # Each passage continued by the next one, cut to PROMPT_LEN: no two share a first block.
    ids = [tokenizer.encode(p + " " + PASSAGES[(i + 1) % len(PASSAGES)])[:PROMPT_LEN] for i, p in enumerate(PASSAGES)]
    assert all(len(p) == PROMPT_LEN for p in ids)
    return ids


def complete_all(server: Server, prompts: list[list[int]]) -> list[str]:
    """Send every prompt at once; the greedy answer to each."""

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        resps = await asyncio.gather(*(
            client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
            for p in prompts
        ))
        await client.close()
        return [r.choices[0].text for r in resps]

    return asyncio.run(run())


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_metric(server: Server, name: str, done, timeout: float = 10) -> float:
    """The scheduler's figures reach /metrics through the tokenizers' heartbeats: poll."""
    deadline = time.monotonic() + timeout
    while not done(value := metric(server, name)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return value


@pytest.fixture(scope="module")
def reference(server, prompts) -> list[str]:
    outputs = complete_all(server, prompts)
    assert all(outputs)
    return outputs


# Room for 3 of the 6 prompts and 1 block more: the running decodes must preempt.
SMALL_POOL = 3 * 4 + 1


@pytest.mark.parametrize(
    "flags",
    [
        ("--no-enable-prefix-caching", "--max-num-batched-tokens", "32"),
        ("--max-num-batched-tokens", "256", "--num-gpu-blocks-override", str(SMALL_POOL),
         "--max-model-len", str(SMALL_POOL * 16)),
        ("--max-num-batched-tokens", "4096", "--no-async-scheduling"),
    ],
    ids=["no-prefix-caching-32", "small-pool-256", "sync-4096"],
)
def test_greedy_outputs_are_the_same_whatever_the_scheduler_settings(tmp_path, prompts, reference, flags):
    srv = start_server(str(tmp_path), "--num-tokenizers", "1", *flags)
    try:
        assert complete_all(srv, prompts) == reference
        steps = srv.steps()
        budget = int(flags[flags.index("--max-num-batched-tokens") + 1])
        assert max(sum(s["requests"].values()) for s in steps) <= budget
        if budget == 32:
            assert max(sum(s["requests"].values()) for s in steps) == 32  # prompts were chunked
            assert steps[-1]["prefix_cache_queries"] == 0
        if "--num-gpu-blocks-override" in flags:
            assert wait_for_metric(srv, "pagoda:num_preemptions_total", lambda v: v > 0) > 0
        if "--no-async-scheduling" in flags:
            assert all(s["in_flight"] == 0 for s in steps), "a step was planned while another ran"
    finally:
        srv.stop()


def test_a_request_sharing_a_long_prefix_computes_only_its_own_tokens(server, tokenizer):
    shared = tokenizer.encode(SHARED_PREFIX)[:300]  # 18 full blocks and 12 tokens
    first = shared + tokenizer.encode(" Question: how late may a player arrive?")
    second = shared + tokenizer.encode(" Question: who plays new members first?")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=first, max_tokens=2, temperature=0)
    resp = client.completions.create(model=EMBEDDED_MODEL_NAME, prompt=second, max_tokens=2, temperature=0)
    assert resp.usage.prompt_tokens == len(second)

    steps = server.steps()
    (i,) = [i for i, s in enumerate(steps) if resp.id in s["new"]]
    assert steps[i]["cached"][resp.id] == 288
    assert steps[i]["requests"][resp.id] == len(second) - 288  # only the unshared tokens are computed
    assert steps[i]["prefix_cache_hits"] - steps[i - 1]["prefix_cache_hits"] == 288
    assert steps[i]["prefix_cache_queries"] - steps[i - 1]["prefix_cache_queries"] == len(second)
    total = steps[i]["prefix_cache_hits"]
    assert wait_for_metric(server, "pagoda:prefix_cache_hits_total", lambda v: v >= total) == total


def test_async_scheduling_keeps_the_next_step_queued_and_the_worker_reports_its_idle_time(server):
    steps = server.steps()
    assert any(s["in_flight"] == 1 for s in steps), "no step was planned while another ran"
    assert all(s["worker_idle_s"] >= 0 and s["worker_execute_s"] > 0 for s in steps)


def test_n_greedy_samples_share_one_prefill_and_equal_a_single_answer(server, client):
    kw = dict(model=EMBEDDED_MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0)
    one = client.completions.create(**kw).choices[0].text
    many = client.completions.create(n=3, **kw)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [one] * 3
    steps = [s for s in server.steps() if any(rid.startswith(many.id) for rid in s["requests"])]
    computed = {f"{many.id}#{i}": sum(s["requests"].get(f"{many.id}#{i}", 0) for s in steps) for i in range(3)}
    prompt_len = many.usage.prompt_tokens
    # Sample 0 computes the prompt; the others fork, copy the partial block and compute one token.
    assert computed[f"{many.id}#0"] == prompt_len + 5
    assert computed[f"{many.id}#1"] == computed[f"{many.id}#2"] == 1 + 5
    assert sum(s["block_copies"] for s in steps) == 2
