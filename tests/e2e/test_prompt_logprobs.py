"""Prompt logprobs end to end, through the official openai SDK and the offline `LLM`, against
transformers (the same tiny Llama folder in fp32, log_softmax of its logits): vLLM's
`prompt_logprobs` on both APIs, and the legacy `echo` + `logprobs` format lm-evaluation-harness
reads log-likelihoods from (with max_tokens 0 and 1).

One server serves them all with a step budget of 32 tokens, so a longer prompt is computed in
chunks, and prefix caching on (the default), so a prompt sent again could hit the cache.
"""

from __future__ import annotations

import random

import openai
import pytest
import torch

from tests.conftest import start_server
from tests.tiny_models import REAL_INIT

BUDGET = 32
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def model(tiny):
    return tiny("llama", REAL_INIT)  # trained-scale weights: logprobs near -log(vocab), no ties


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    folder, _ = model
    srv = start_server(
        str(tmp_path_factory.mktemp("prompt-logprobs")), "--model", str(folder), "--dtype", "float32",
        "--kv-cache-memory-gb", "0.05", "--num-tokenizers", "1", "--max-num-batched-tokens", str(BUDGET),
        "--chat-template", TEMPLATE,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@torch.inference_mode()
def reference(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: transformers' fp32 log_softmax at every position but the last."""
    return hf_model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 320) for _ in range(n)]


def close(ours: float, want: float) -> bool:
    return abs(ours - want) / abs(want) < 1e-4


def check_vllm_shape(entries: list, ids: list[int], expected: torch.Tensor, k: int, tokenizer) -> None:
    """vLLM's prompt_logprobs: None first, then per prompt token a dict by token id (JSON: the id
    as a string) of {logprob, rank, decoded_token}: the token's own entry and the k most likely."""
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        lp = expected[j - 1]
        entry = entries[j]
        own = entry[str(ids[j])]
        assert close(own["logprob"], lp[ids[j]].item()), (j, own, lp[ids[j]])
        assert own["rank"] == int((lp >= lp[ids[j]]).sum())
        assert own["decoded_token"] == tokenizer.decode([ids[j]])
        top = lp.topk(k)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert close(entry[str(t)]["logprob"], v)
            assert entry[str(t)]["rank"] == (own["rank"] if t == ids[j] else rank)
        assert set(entry) == {str(ids[j])} | {str(t) for t in top.indices.tolist()}


def prompt_logprobs_of(obj) -> list:
    return obj.model_dump()["prompt_logprobs"]


def test_completions_prompt_logprobs_match_transformers(client, model, tokenizer) -> None:
    """(a) A prompt computed in one step, vLLM's field on every choice (n = 2 shares them)."""
    _, hf_model = model
    ids = random_ids(20, 1)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=ids, max_tokens=2,
                                    temperature=0, n=2, extra_body={"prompt_logprobs": 3})
    expected = reference(hf_model, ids)
    for choice in out.choices:
        check_vllm_shape(prompt_logprobs_of(choice), ids, expected, 3, tokenizer)
    assert out.choices[0].logprobs is None  # not asked for
    plain = client.completions.create(model=out.model, prompt=ids, max_tokens=2, temperature=0)
    assert "prompt_logprobs" not in plain.choices[0].model_dump()


def test_chat_prompt_logprobs_are_the_response_s(client, model, tokenizer) -> None:
    _, hf_model = model
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=1, temperature=0,
                                         messages=[{"role": "user", "content": text}],
                                         extra_body={"prompt_logprobs": 0})
    check_vllm_shape(prompt_logprobs_of(out), ids, reference(hf_model, ids), 0, tokenizer)
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.chat.completions.create(model=out.model, messages=[{"role": "user", "content": text}], stream=True,
                                       extra_body={"prompt_logprobs": 1})


def test_a_prompt_in_the_prefix_cache_still_gets_every_position(client, server, model, tokenizer) -> None:
    """(b) The same prompt twice, the first time without prompt logprobs: its blocks are in the
    cache, and a request asking for prompt logprobs does not take them (it computes them all)."""
    _, hf_model = model
    ids = random_ids(40, 2)  # two full blocks of 16 to hit
    name = client.models.list().data[0].id
    client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0)
    first = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 2})
    second = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 2})
    again = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0)
    expected = reference(hf_model, ids)
    check_vllm_shape(prompt_logprobs_of(first.choices[0]), ids, expected, 2, tokenizer)
    check_vllm_shape(prompt_logprobs_of(second.choices[0]), ids, expected, 2, tokenizer)
    cached = {rid: n for step in server.steps() for rid, n in step["cached"].items()}
    assert cached[first.id] == cached[second.id] == 0
    assert cached[again.id] == 32  # the cache did hold them


def test_a_prompt_in_chunks_gets_every_position_once(client, server, model, tokenizer) -> None:
    """(c) A prompt of 100 tokens with a step budget of 32: four chunks, each returning its
    positions (the last of a chunk predicting the next chunk's first token)."""
    _, hf_model = model
    ids = random_ids(100, 3)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=ids, max_tokens=1,
                                    temperature=0, extra_body={"prompt_logprobs": 4})
    check_vllm_shape(prompt_logprobs_of(out.choices[0]), ids, reference(hf_model, ids), 4, tokenizer)
    chunks = [step["requests"][out.id] for step in server.steps() if out.id in step["requests"]]
    assert chunks == [32, 32, 32, 4]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_is_openai_s_legacy_format(client, model, tokenizer, max_tokens: int) -> None:
    """What lm-evaluation-harness sends for a log-likelihood: the prompt tokens first in
    `logprobs` (the first with None), then the generated ones; max_tokens 0 is the prompt alone."""
    _, hf_model = model
    text = "Paged attention keeps keys and values in fixed-size blocks."
    ids = tokenizer.encode(text)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=text, echo=True, logprobs=2,
                                    max_tokens=max_tokens, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    names = [tokenizer.decode([t]) for t in ids]
    assert lp.tokens[: len(ids)] == names
    assert len(lp.tokens) == len(ids) + max_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = reference(hf_model, ids)
    for j in range(1, len(ids)):
        assert close(lp.token_logprobs[j], expected[j - 1, ids[j]].item())
        top = expected[j - 1].topk(2)
        assert lp.top_logprobs[j] == pytest.approx(
            {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}, rel=1e-4)
    offsets = [sum(len(n) for n in names[:j]) for j in range(len(ids))]
    assert lp.text_offset[: len(ids)] == offsets
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert choice.text == text and choice.finish_reason == "length"
    else:
        # The generated (greedy) token after them, at the end of the prompt's text, with its logprob.
        with torch.inference_mode():
            last = hf_model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        generated = int(last.argmax())
        assert choice.text == text + tokenizer.decode([generated])
        assert lp.tokens[-1] == tokenizer.decode([generated]) and lp.text_offset[-1] == len(text)
        assert close(lp.token_logprobs[-1], last[generated].item())


def test_streamed_echo_with_logprobs_sends_the_prompt_s_first(client, model, tokenizer) -> None:
    _, hf_model = model
    ids = random_ids(12, 4)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt=ids, echo=True, logprobs=1,
                                       max_tokens=3, temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[0] is None and len(first.tokens) == len(ids) + 1
    expected = reference(hf_model, ids)
    assert all(close(first.token_logprobs[j], expected[j - 1, ids[j]].item()) for j in range(1, len(ids)))
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == len(ids) + 3


def test_prompt_logprobs_refused_beyond_20_and_when_streamed(client) -> None:
    name = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="between 0 and 20"):
        client.completions.create(model=name, prompt="Hi", max_tokens=1, extra_body={"prompt_logprobs": 21})
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model=name, prompt="Hi", max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=name, prompt="Hi", max_tokens=0)


def test_offline_llm_request_output_prompt_logprobs(model, tokenizer) -> None:
    """vLLM's `RequestOutput.prompt_logprobs`: None, then dicts token id -> Logprob, computed in
    chunks of 16 here."""
    from frontend import LLM, SamplingParams

    folder, hf_model = model
    ids = random_ids(50, 5)
    with LLM(str(folder), dtype="float32", kv_cache_memory_gb=0.05, max_num_batched_tokens=16) as llm:
        [out] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2), use_tqdm=False)
        [plain] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert plain.prompt_logprobs is None
    entries = out.prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    expected = reference(hf_model, ids)
    for j in range(1, len(ids)):
        own = entries[j][ids[j]]
        assert close(own.logprob, expected[j - 1, ids[j]].item())
        assert own.rank == int((expected[j - 1] >= expected[j - 1, ids[j]]).sum())
        assert own.decoded_token == tokenizer.decode([ids[j]])
        assert set(entries[j]) == {ids[j], *expected[j - 1].topk(2).indices.tolist()}
