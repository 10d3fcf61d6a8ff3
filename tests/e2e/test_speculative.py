"""Speculative decoding (n-gram drafts) through every process, on the embedded SmolLM2.

The model is dequantized to fp32 (`quantization="none"`), where a row's numbers do not depend
on how many positions a forward scores: greedy text with drafts must then be the text
without, token for token (and that is transformers' own: tests/worker/test_model_runner.py).
With the CPU's bf16 4-bit kernels a near-tie may flip either way; that path is tested with
drafts in tests/e2e/test_serve_models.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from bench.copy_prompts import copy_messages
from frontend import LLM, SamplingParams
from protocol import EMBEDDED_MODEL_NAME, EngineConfig
from tests.conftest import start_server
from tests.e2e.streams import greedy_chat_streams
from tokenizer_svc.model_source import embedded_gguf_path
from tokenizer_svc.tokenizer_loader import load_tokenizer

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
OTHER = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a haiku about the sea."}]]


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=1024, quantization="none", speculative_config=SPEC) as llm:
        yield llm


def test_greedy_text_with_drafts_is_the_text_without(llm):
    tok = load_tokenizer(EngineConfig())
    chats = copy_messages()[:3] + OTHER
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for c in chats]
    # The reference: the same engine, drafts off for these requests (a seeded request gets none;
    # greedy ignores the seed). In fp32 that is transformers' greedy text (test_model_runner.py).
    before = llm.scheduler_stats
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, seed=0), use_tqdm=False)
    between = _settled(llm, before)
    assert between.spec_num_drafts == before.spec_num_drafts
    # With drafts: four at once (the default disable_by_batch_size), then one alone; prompts of
    # 14 to 100 tokens.
    outs = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    outs += llm.generate(prompts[4:], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    for out, ref in zip(outs, plain, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, out.outputs[0].text
    after = _settled(llm, between)
    drafts = after.spec_num_drafts - between.spec_num_drafts
    accepted = after.spec_num_accepted_tokens - between.spec_num_accepted_tokens
    assert drafts > 10 and accepted > drafts  # the copies keep most of their drafts
    assert len(after.spec_num_accepted_tokens_per_pos) == 4


def test_stops_max_tokens_and_sampling_with_drafts(llm):
    chat = copy_messages()[1]  # the library passage: "... for three weeks. Books can be renewed ..."
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=200, stop=["three weeks"]), use_tqdm=False)[0]
    text = out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop" and text.endswith("for ") and "three" not in text
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=23), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 23 and out.outputs[0].finish_reason == "length"
    outs = llm.chat([chat] * 3, SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=40), use_tqdm=False)
    for o in outs:
        assert 0 < len(o.outputs[0].token_ids) <= 40 and o.outputs[0].text


def _settled(llm, before, timeout_s: float = 10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = llm.scheduler_stats
        if stats.num_steps > before.num_steps and stats.num_running == 0:
            return stats
        time.sleep(0.05)
    return llm.scheduler_stats


def test_streams_with_drafts_survive_a_worker_kill(tmp_path):
    server = start_server(str(tmp_path), "--max-model-len", "1024", "--quantization", "none",
                          "--speculative-config", json.dumps(SPEC))
    try:
        chats = copy_messages()[:4]
        undisturbed = greedy_chat_streams(server, chats, 56, under_way=10)
        assert greedy_chat_streams(server, chats, 56, kill_role="worker", under_way=10) == undisturbed
        assert "restart" in server.log().lower()
        metrics = httpx.get(server.base_url + "/metrics").text
        assert "pagoda:spec_decode_num_accepted_tokens_total" in metrics
        labels = f'{{model_name="{EMBEDDED_MODEL_NAME}",position="0"}}'
        per_pos = "pagoda:spec_decode_num_accepted_tokens_per_pos_total" + labels
        assert per_pos in metrics
    finally:
        server.stop()


# ---- draft-model workers: the target itself as the draft ----------------------------------------

SELF_DRAFT = {"method": "draft_model", "model": embedded_gguf_path(), "num_speculative_tokens": 3}


def test_self_draft_keeps_every_draft_and_a_killed_draft_worker_loses_no_stream(tmp_path):
    """The target (fp32) as its own draft model, through every process. Every draft is the
    target's greedy token, so all are kept (acceptance 1.0: k + 1 tokens per verified step where
    k drafts were asked) and the text is the text without drafts, for prompts of mixed lengths.
    Then the draft worker is SIGKILLed under 3 streams: none is lost, each ends with the same
    text, and the restarted draft worker proposes again."""
    server = start_server(str(tmp_path), "--max-model-len", "1024", "--quantization", "none",
                          "--speculative-config", json.dumps(SELF_DRAFT))
    try:
        base = server.base_url
        chats = copy_messages()[:3]  # long answers: each stream is well under way at the kill
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")

        def answer(messages: list, **kw) -> str:
            out = client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=messages, temperature=0,
                                                 max_tokens=36, **kw)
            return out.choices[0].message.content

        # Without drafts (a seeded request gets none; greedy ignores the seed), all at once: in
        # fp32 a row's tokens do not depend on the batch around it. These need no draft worker,
        # so they run while it loads (it is set up once the target serves). Then with drafts.
        with ThreadPoolExecutor(len(chats + OTHER)) as pool:
            plain = list(pool.map(lambda m: answer(m, seed=0), chats + OTHER))
        _wait_until(lambda: "worker-draft-0 ready" in server.log(), 300)
        names = ("drafts", "draft_tokens", "accepted_tokens")
        before = _settled_spec_counters(base, names)
        assert before["drafts"] == 0  # the seeded requests got none
        # The two short prompts together (2 at once: drafts stay on up to disable_by_batch_size, 4).
        with ThreadPoolExecutor(len(OTHER)) as pool:
            assert list(pool.map(answer, OTHER)) == plain[3:]
        undisturbed = greedy_chat_streams(server, chats, 36)
        assert undisturbed == plain[:3]
        after = _settled_spec_counters(base, names)
        drafts, draft_tokens, accepted = (after[n] - before[n] for n in ("drafts", "draft_tokens", "accepted_tokens"))
        assert drafts > 20 and accepted == draft_tokens  # acceptance rate 1.0
        assert draft_tokens >= 3 * drafts - 2 * len(plain)  # k = 3 but where max_tokens leaves fewer
        assert greedy_chat_streams(server, chats, 36, kill_role="draft-worker") == undisturbed
        log = server.log()
        assert "draft worker worker-draft-0 lost" in log and "decoding goes on without drafts" in log
        # Restarted, it is set up again and proposes again.
        _wait_until(lambda: server.log().count("worker-draft-0 ready") >= 2, 300)
        drafts = _metric(base, "pagoda:spec_decode_num_drafts_total")
        assert answer(chats[0]) == undisturbed[0]
        assert _metric(base, "pagoda:spec_decode_num_drafts_total") > drafts
    finally:
        server.stop()


def _metric(base: str, name: str) -> float:
    return _metric_in(httpx.get(base + "/metrics").text, name)


def _settled_spec_counters(base: str, names: tuple[str, ...], timeout_s: float = 10.0) -> dict[str, float]:
    """The spec-decode counters from one /metrics scrape (one snapshot of the scheduler's stats),
    once two scrapes in a row agree: the last step's stats reach the frontend after its tokens,
    so a scrape right after a stream ends may still lack them."""
    import time

    def scrape() -> dict[str, float]:
        text = httpx.get(base + "/metrics").text
        return {n: _metric_in(text, f"pagoda:spec_decode_num_{n}_total") for n in names}

    deadline = time.monotonic() + timeout_s
    last = scrape()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = scrape()
        if now == last:
            return now
        last = now
    raise AssertionError(f"the spec-decode counters did not settle in {timeout_s} s: {last}")


def _metric_in(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def _wait_until(cond, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)
