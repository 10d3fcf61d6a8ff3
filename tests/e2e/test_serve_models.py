"""Tiny models of two families through every process: the offline `LLM` on a hub id from the
Hugging Face cache at a revision, and `pagoda serve` with --tokenizer, --served-model-name and
--dtype (each costs ~10 s of process start-up, so not every family goes this way)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import start_server
from tests.model_check import MAX_TOKENS, hf_greedy, random_prompts
from tests.tiny_models import build_tiny_model, fake_hub_cache


def test_llm_serves_a_hub_id_from_the_cache_at_the_asked_revision(tokenizer, tmp_path) -> None:
    from frontend import LLM, SamplingParams

    main = build_tiny_model("llama", tmp_path / "main", tokenizer, seed=1)
    v2 = build_tiny_model("llama", tmp_path / "v2", tokenizer, seed=2)
    cache = fake_hub_cache(
        tmp_path / "hub", "tiny-org/tiny-llama", {"a" * 40: tmp_path / "main", "b" * 40: tmp_path / "v2"},
        {"main": "a" * 40, "v2": "b" * 40},
    )
    prompts = random_prompts(len(tokenizer))
    expected = hf_greedy(v2, prompts)
    assert expected != hf_greedy(main, prompts)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        with LLM("tiny-org/tiny-llama", revision="v2", kv_cache_memory_gb=0.05) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_pagoda_serve_honours_tokenizer_served_name_and_dtype(tiny, tokenizer, tmp_path) -> None:
    import openai

    folder, hf_model = tiny("gpt2")
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, weights_only)
    server = start_server(
        str(tmp_path), "--model", str(weights_only), "--tokenizer", str(folder), "--served-model-name", "tiny-gpt2",
        "--dtype", "float32", "--kv-cache-memory-gb", "0.05", "--num-tokenizers", "1",
    )
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
        prompts = random_prompts(len(tokenizer), (5, 21))
        for prompt, expected in zip(prompts, hf_greedy(hf_model, prompts)):
            out = client.completions.create(
                model="tiny-gpt2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
            )
            assert [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens] == expected
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=str(weights_only), prompt="hi", max_tokens=1)
    finally:
        server.stop()


def test_pagoda_serve_exits_1_with_one_line_for_an_unsupported_architecture(tiny, tmp_path) -> None:
    folder, _ = tiny("qwen3")
    falcon = tmp_path / "falcon"
    shutil.copytree(folder, falcon)
    config = (falcon / "config.json").read_text().replace("Qwen3ForCausalLM", "FalconForCausalLM")
    (falcon / "config.json").write_text(config)
    cmd = [sys.executable, "-m", "pagoda", "serve", "--model", str(falcon), "--num-tokenizers", "1",
           "--port", "0", "--kv-cache-memory-gb", "0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "architecture FalconForCausalLM is not supported (supported: LlamaForCausalLM," in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_embedded_gguf_is_served_quantized_with_drafts(tmp_path) -> None:
    """The CPU's default path for the embedded model (4-bit kernels) through every process, with
    n-gram drafts: a right answer, a streamed copy of a passage, the drafts counted."""
    import httpx
    import openai

    from bench.copy_prompts import PASSAGES, copy_messages

    spec = '{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4}'
    server = start_server(str(tmp_path), "--quantization", "gguf", "--max-model-len", "1024",
                          "--speculative-config", spec)
    try:
        assert "120 matrices kept quantized" in server.log()  # 30 layers x (qkv, o, gate_up, down)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=32,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content
        chunks = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=120,
                                                messages=copy_messages()[0], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert PASSAGES[0][:100] in text
        metrics = httpx.get(server.base_url + "/metrics").text
        name = "pagoda:spec_decode_num_accepted_tokens_total"
        accepted = [line for line in metrics.splitlines() if line.startswith(name)]
        assert accepted and float(accepted[0].split()[-1]) > 20
    finally:
        server.stop()
