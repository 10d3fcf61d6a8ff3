"""The offline `LLM` API on the same processes, and its greedy tokens against transformers."""

from __future__ import annotations

import pytest

from frontend import LLM, SamplingParams
from tests.model_check import assert_greedy_equal_up_to_near_ties

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def llm():
    with LLM(num_tokenizers=1) as engine:
        yield engine


def test_generate_returns_vllm_shaped_outputs(llm):
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        completion = out.outputs[0]
        assert completion.text and len(completion.token_ids) <= 8
        assert completion.finish_reason in ("stop", "length")
        assert out.num_prompt_tokens > 0


def test_logprobs_cumulative_logprob_n_and_metrics(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4, logprobs=2, ignore_eos=True)
    [out] = llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1]
    for completion in out.outputs:
        assert completion.logprobs is not None and len(completion.logprobs) == 4
        for token_id, step in zip(completion.token_ids, completion.logprobs, strict=True):
            # The top 2 by rank, and the sampled token (rank None when it is not among them).
            assert token_id in step and sorted(lp.rank for lp in step.values() if lp.rank) == [1, 2]
            chosen = step[token_id]
            assert chosen.rank or chosen.logprob <= min(lp.logprob for lp in step.values() if lp.rank)
        total = sum(step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs))
        assert completion.cumulative_logprob == pytest.approx(total) and total < 0
    assert out.metrics["time_to_first_token_s"] > 0 and out.metrics["decode_tokens_per_s"] > 0


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_first_32_greedy_tokens_follow_transformers_on_the_same_gguf(llm, smollm2_gguf_hf_model):
    from protocol import EngineConfig
    from tokenizer_svc.tokenizer_loader import load_tokenizer

    tok = load_tokenizer(EngineConfig())
    model = smollm2_gguf_hf_model  # transformers on the same GGUF, dequantized to fp32
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    outs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for ids, out in zip(prompt_ids, outs):
        assert len(out.outputs[0].token_ids) == 32
        assert_greedy_equal_up_to_near_ties(out.outputs[0].token_ids, model, ids)


def test_fp8_kv_cache_defaults_to_64_slot_blocks_and_generates_as_with_16():
    """--kv-cache-dtype fp8 without --block-size: 64-slot blocks in the scheduler and the worker
    alike (prompts of several blocks, a decode crossing a block edge), and the greedy tokens of
    16-slot blocks over the same fp8 cache."""
    long_prompt = " ".join(PROMPTS * 8)  # ~150 tokens: three 64-slot blocks
    prompts = [long_prompt, PROMPTS[2]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = {}
    for block_size in (None, 16):
        args = {} if block_size is None else {"block_size": block_size}
        with LLM(kv_cache_dtype="fp8", **args) as engine:
            assert engine.config.block_size == (block_size or 64)
            outs = engine.generate(prompts, params, use_tqdm=False)
            again = engine.generate(prompts[:1], params, use_tqdm=False)  # its full blocks now cached
        tokens[block_size] = [o.outputs[0].token_ids for o in outs]
        assert again[0].outputs[0].token_ids == tokens[block_size][0]
        assert outs[0].num_prompt_tokens > 128 and all(len(t) == 24 for t in tokens[block_size])
    assert tokens[None] == tokens[16]
