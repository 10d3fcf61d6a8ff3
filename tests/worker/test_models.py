"""Every model family against transformers, on tiny random models with the family's real layout.

Each family runs through the `ModelRunner` (paged KV cache, shuffled block tables, one batched
prefill of mixed-length prompts then batched decodes): greedy tokens identical to
`transformers.generate`, last-position logits within 1e-4 (tests/e2e/test_serve_models.py runs
two families through every process). GGUF files of every listed
quantization are compared with transformers reading the same file. bf16 logits stay within
2e-2 of fp32 on models of a trained model's weight scale.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM, Qwen3ForCausalLM

from gpu_worker.layers import RESCORED
from gpu_worker.loader import ModelLoadError, resolve_dtype
from gpu_worker.model_config import build_model_config
from gpu_worker.model_runner import ModelRunner
from gpu_worker.models import MODEL_REGISTRY
from kernels import quant_linear
from protocol.config import EngineConfig
from tests.model_check import (
    MAX_TOKENS,
    hf_greedy,
    hf_last_logits,
    make_runner,
    random_prompts,
    relative_error,
    runner_greedy,
    runner_last_logits,
)
from tests.tiny_gguf import Q, llama3_rope_freqs, write_gguf
from tests.tiny_models import (
    FAMILIES,
    LLAMA3_ROPE,
    REAL_INIT,
    fake_hub_cache,
    family_config,
)
from tokenizer_svc.model_source import resolve_model_path
from tokenizer_svc.tokenizer_loader import TokenizerLoadError, load_tokenizer

FP32_LOGITS_RTOL = 1e-4
BF16_LOGITS_RTOL = 2e-2


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def assert_matches_transformers(
    model: str, hf_model: PreTrainedModel, vocab_size: int, top: int | None = None, **kw: object
) -> ModelRunner:
    """Greedy tokens equal and last logits within fp32 rounding (only transformers' `top` best of
    each row, if given)."""
    runner = make_runner(model, **kw)
    prompts = random_prompts(vocab_size)
    assert runner_greedy(runner, prompts) == hf_greedy(hf_model, prompts)
    ours, reference = runner_last_logits(runner, prompts), hf_last_logits(hf_model, prompts)
    if top is not None:
        best = reference.topk(top, dim=-1).indices
        ours, reference = ours.gather(1, best), reference.gather(1, best)
    assert relative_error(ours, reference) < FP32_LOGITS_RTOL
    return runner


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gives_transformers_greedy_tokens_and_logits(family, tiny, tokenizer) -> None:
    folder, hf_model = tiny(family)
    assert_matches_transformers(str(folder), hf_model, len(tokenizer))


def on_device(hf_model: PreTrainedModel, device: str) -> PreTrainedModel:
    """A copy of a shared (fixture-cached) transformers model on `device`: `Module.to` moves the
    model in place, which would hand later tests on the CPU a CUDA model."""
    return hf_model if device == "cpu" else copy.deepcopy(hf_model).to(device)


def assert_bf16_logits_near_fp32(folder: Path, hf_model: PreTrainedModel, vocab_size: int, device: str) -> None:
    """bf16 against the fp32 truth, on weights of a trained model's scale (REAL_INIT): there bf16
    errs by ~1%. (The wide-init models amplify bf16 rounding to 2-4%, in transformers' bf16 as
    much as in ours, so there a bound would measure the init, not the implementation.)"""
    prompts = random_prompts(vocab_size)
    reference = hf_last_logits(on_device(hf_model, device), prompts)
    runner = make_runner(str(folder), device=device, dtype="bfloat16")
    assert relative_error(runner_last_logits(runner, prompts), reference) < BF16_LOGITS_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_family_bf16_logits_are_near_fp32(family, tiny, tokenizer) -> None:
    folder, hf_model = tiny(family, REAL_INIT)
    assert_bf16_logits_near_fp32(folder, hf_model, len(tokenizer), "cpu")


# ---- checkpoint layouts ----------------------------------------------------------------------


def test_sharded_safetensors_with_index_load(tiny, tokenizer, tmp_path) -> None:
    _, hf_model = tiny("qwen2")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    prompts = random_prompts(len(tokenizer), (9,))
    assert runner_greedy(make_runner(str(tmp_path)), prompts, 8) == hf_greedy(hf_model, prompts, 8)


@pytest.mark.parametrize(("family", "prefix"), [("gpt2", "transformer."), ("opt", "model.")])
def test_hub_style_pytorch_bin_without_the_base_prefix_loads(family, prefix, tiny, tokenizer, tmp_path) -> None:
    """The hub's gpt2 and opt-125m: pytorch_model.bin of the base model, GPT-2 with mask buffers."""
    folder, hf_model = tiny(family)
    state = {k.removeprefix(prefix): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    if family == "gpt2":
        state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(folder / "config.json", tmp_path)
    prompts = random_prompts(len(tokenizer), (9,))
    assert runner_greedy(make_runner(str(tmp_path)), prompts, 8) == hf_greedy(hf_model, prompts, 8)


# ---- GGUF ----------------------------------------------------------------------------------

ALL_QUANTS = [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16, Q.F32]
GGUF_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


@pytest.mark.parametrize("arch", list(GGUF_CLASSES))
def test_gguf_of_every_quant_type_matches_transformers_reading_the_same_file(arch, tmp_path, monkeypatch) -> None:
    # Widths of 256: a K-quant block spans 256 values of a row.
    model_class, config = family_config(arch, 320)
    # Qwen3's head_dim of 128 whatever the width (transformers assumes it for Qwen3 GGUFs).
    head_dim = 128 if arch == "qwen3" else 64
    config.update(dict(hidden_size=256, intermediate_size=512, head_dim=head_dim, tie_word_embeddings=False))
    torch.manual_seed(0)
    hf_source = GGUF_CLASSES[arch](config).eval()
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(hf_source, path, arch, ALL_QUANTS, eos_token_id=0)
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert set(ALL_QUANTS) <= types
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    # Dequantized at load: transformers' numbers exactly.
    assert_matches_transformers(str(path), hf_model, 320, quantization="none")
    # Kept quantized (the CPU's default), the 4-bit kernel run with fp32 activations: the same
    # numbers again, so the blocks' unpacking and the stacking are exact, and so are the LM
    # head's rescored best logits (Q6_K, re-quantized to 8 bits, is left out:
    # tests/kernels/test_quant_linear.py bounds it).
    exact = tmp_path / "exact"
    exact.mkdir()
    write_gguf(hf_source, exact / "tiny.gguf", arch, [q for q in ALL_QUANTS if q != Q.Q6_K], eos_token_id=0)
    hf_model = AutoModelForCausalLM.from_pretrained(str(exact), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with monkeypatch.context() as m:
        m.setattr(quant_linear, "KERNEL_DTYPE", torch.float32)
        runner = assert_matches_transformers(str(exact / "tiny.gguf"), hf_model, 320, top=RESCORED // 4)
    kept = [m for m in runner.model.modules() if getattr(m, "int4", None) is not None]
    assert {type(m).__name__ for m in kept} >= {"MergedLinear", "RowParallelLinear"}  # the path was taken


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
def test_decode_steps_of_a_4bit_gguf_run_every_layer_in_one_c_call_with_the_same_numbers(arch, tmp_path,
                                                                                        monkeypatch) -> None:
    """A CPU step of decodes only runs the decoder layers in one C call (kernels/cpu_native.py's
    DecoderStack) where the four projections are 4-bit: the final hidden states bit for bit those
    of the layer-by-layer Python path, decode after decode at batch 3; Qwen2's q/k/v biases keep
    it on the Python path."""
    from gpu_worker.models import llama
    from kernels import cpu_native

    if not cpu_native.int8_dot_supported():
        pytest.skip("the 4-bit C kernels need AVX512-VNNI")
    model_class, config = family_config(arch, 320)
    config.update(dict(hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=False))
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    write_gguf(GGUF_CLASSES[arch](config).eval(), path, arch, [Q.Q4_1], eos_token_id=0)
    prompts = random_prompts(320, (5, 17, 33))
    forward, calls = llama.LlamaModel.forward, []
    monkeypatch.setattr(llama.LlamaModel, "forward", lambda self, *a: calls.append(forward(self, *a)) or calls[-1])
    stacks = []
    make = llama.LlamaModel._make_native_stack
    monkeypatch.setattr(llama.LlamaModel, "_make_native_stack", lambda self: stacks.append(make(self)) or stacks[-1])
    run, ran = cpu_native.DecoderStack.__call__, []
    monkeypatch.setattr(cpu_native.DecoderStack, "__call__", lambda self, *a: ran.append(run(self, *a)) or ran[-1])
    native_tokens = runner_greedy(make_runner(str(path)), prompts, 6)
    native = list(calls)
    assert len(native) == 6 and [h.shape[0] for h in native] == [55, 3, 3, 3, 3, 3]
    if arch == "qwen2":
        assert stacks == [None]
        return
    assert len(stacks) == 1 and isinstance(stacks[0], cpu_native.DecoderStack)  # built once, then reused
    assert len(ran) == 5 and all(r is not None for r in ran)  # every decode step took it
    calls.clear()
    monkeypatch.setattr(llama.LlamaModel, "_native_stack", lambda self, h, meta: None)
    assert runner_greedy(make_runner(str(path)), prompts, 6) == native_tokens
    for a, b in zip(native, calls):
        assert torch.equal(a, b)


def test_gguf_llama3_rope_freqs_match_the_hugging_face_model(tiny, tokenizer, tmp_path) -> None:
    """llama.cpp stores Llama 3.1's rope scaling as a rope_freqs tensor; transformers ignores it."""
    _, hf_model = tiny("llama")
    path = tmp_path / "llama3.gguf"
    head_dim = hf_model.config.head_dim
    write_gguf(hf_model, path, "llama", [Q.F32], eos_token_id=0, rope_freqs=llama3_rope_freqs(LLAMA3_ROPE, head_dim))
    assert_matches_transformers(str(path), hf_model, len(tokenizer))


def test_a_gguf_files_index_is_cached_and_the_next_load_reads_it_instead_of_parsing(tiny, tokenizer, tmp_path,
                                                                                     monkeypatch) -> None:
    """gguf_contents keeps GGUFReader's metadata values and tensor views as an index in the cache:
    the next load of the same file builds the same views from it (GGUFReader not called) and
    gives transformers' numbers; long arrays (a vocabulary) are left out; a damaged index is
    parsed again and rewritten; an unwritable cache only costs the parse."""
    from gpu_worker.gguf_checkpoint import INDEX_MAX_ARRAY, gguf_contents

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    _, hf_model = tiny("llama")
    path = tmp_path / "m.gguf"
    write_gguf(hf_model, path, "llama", [Q.Q4_1, Q.F16, Q.F32], eos_token_id=0)
    fields, tensors = gguf_contents(str(path))
    (index,) = (tmp_path / "cache" / "gguf-index").glob("*.json")
    reader = gguf.GGUFReader(str(path))
    assert fields == {k: f.contents() for k, f in reader.fields.items() if len(f.data) <= INDEX_MAX_ARRAY}
    real = gguf.GGUFReader

    def parse(*a, **kw):
        parsed.append(1)
        return real(*a, **kw)

    parsed: list[int] = []
    monkeypatch.setattr(gguf, "GGUFReader", parse)
    again, views = gguf_contents(str(path))
    assert not parsed and again == fields and fields["llama.block_count"] == hf_model.config.num_hidden_layers
    assert [(t.name, t.tensor_type, list(t.shape)) for t in views] == [(t.name, t.tensor_type, list(t.shape))
                                                                        for t in reader.tensors]
    assert all(a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data) for a, b in zip(views, reader.tensors))
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    parsed.clear()  # (transformers parsed the file for itself)
    assert_matches_transformers(str(path), hf_gguf, len(tokenizer), quantization="none")  # loaded from the index
    assert not parsed
    index.write_text("{not json")
    assert gguf_contents(str(path))[0] == fields and len(parsed) == 1
    assert json.loads(index.read_text())["fields"] == fields
    index.write_text(json.dumps({"version": 1, "fields": {}, "tensors": [{"name": "x"}]}))  # not this file's
    assert gguf_contents(str(path))[0] == fields and len(parsed) == 2
    monkeypatch.setenv("PAGODA_CACHE_DIR", "/proc/no-cache-here")
    assert gguf_contents(str(path))[0] == fields and len(parsed) == 3


def test_materialize_keeps_shared_parameters_shared_and_the_worker_never_imports_sympy(tiny, tmp_path) -> None:
    """gpu_worker.loader.materialize (the model built on the meta device, then given storage)
    in place of `to_empty`, whose meta-tensor stride logic imports sympy (~0.5 s of a worker
    start): shapes and dtypes kept, a parameter two modules share stays one, and loading a model
    and decoding leave sympy unimported (in a fresh interpreter)."""
    import subprocess
    import sys

    from torch import nn

    from gpu_worker.loader import materialize

    with torch.device("meta"):
        a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        b.weight = a.weight
        model = nn.Sequential(a, b, nn.BatchNorm1d(3)).to(torch.float16)
    materialize(model, "cpu")
    assert model[0].weight is model[1].weight and model[0].weight.device.type == "cpu"
    assert model[0].weight.dtype == torch.float16 and model[2].running_mean.shape == (3,)
    assert isinstance(model[0].bias, nn.Parameter) and model[0].bias is not model[1].bias
    folder, _ = tiny("llama")
    code = ("import sys; from tests.model_check import make_runner, runner_greedy; "
            f"r = make_runner({str(folder)!r}); runner_greedy(r, [[3, 4, 5]], 2); print('sympy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", proc.stderr[-2000:]


# ---- user errors -----------------------------------------------------------------------------


def load_error(model: str, **kw: object) -> str:
    with pytest.raises(ModelLoadError) as info:
        make_runner(model, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_corrupt_and_unsupported_checkpoints_say_what_is_wrong(tiny, tmp_path) -> None:
    folder, _ = tiny("smollm2")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or incomplete" in load_error(str(broken)) and str(weights) in load_error(str(broken))

    weights.unlink()
    assert "no weights in" in load_error(str(broken))

    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert "cannot read GGUF file" in load_error(str(tmp_path / "bad.gguf"))

    config = (folder / "config.json").read_text()
    shutil.copy(folder / "model.safetensors", broken)
    (broken / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    assert "checkpoint is missing weights: model.layers.2." in load_error(str(broken))

    (broken / "config.json").write_text(config.replace('"rope_type": "default"', '"rope_type": "yarn"'))
    assert "rope scaling 'yarn' is not supported" in load_error(str(broken))

    assert "does not exist" in load_error(str(tmp_path / "nowhere"))


def hf_config(family: str, **changes: object) -> dict:
    """The config.json dict of a tiny `family` model, with `changes`."""
    return {**family_config(family, 320)[1].to_dict(), **changes}


def context_length(family: str, **changes: object) -> int:
    return build_model_config(MODEL_REGISTRY["LlamaForCausalLM"], hf_config(family, **changes)).max_position_embeddings


def test_a_sliding_window_in_use_caps_the_context(caplog) -> None:
    """Below the window, sliding-window attention is full attention: the context stops there."""
    hf = hf_config("mistral", sliding_window=64)
    with caplog.at_level(logging.WARNING):
        config = build_model_config(MODEL_REGISTRY["MistralForCausalLM"], hf)
    assert config.max_position_embeddings == 64 and "the context is capped at the window, 64" in caplog.text
    assert hf["max_position_embeddings"] == 256  # the checkpoint's own dict is left alone
    assert context_length("mistral", sliding_window=4096) == 256
    # Qwen configs name a window that only use_sliding_window or a sliding layer switch on.
    assert context_length("qwen2", sliding_window=64) == 256
    assert context_length("qwen2", sliding_window=64, use_sliding_window=True) == 64
    assert context_length("qwen3", sliding_window=64, layer_types=["sliding_attention", "full_attention"]) == 64


def test_config_features_not_implemented_fail_the_load_with_one_line() -> None:
    gpt2, llama = MODEL_REGISTRY["GPT2LMHeadModel"], MODEL_REGISTRY["LlamaForCausalLM"]
    with pytest.raises(ValueError, match=r"^activation 'swish' is not supported \(supported: gelu_new, "):
        build_model_config(gpt2, hf_config("gpt2", activation_function="swish"))
    with pytest.raises(ValueError, match="^scale_attn_weights=False is not supported$"):
        build_model_config(gpt2, hf_config("gpt2", scale_attn_weights=False))
    with pytest.raises(ValueError, match=r"^rope scaling 'yarn' is not supported \(supported: default, "):
        build_model_config(llama, hf_config("llama", rope_parameters={"rope_type": "yarn"}))


def test_hub_id_resolves_in_the_cache_or_says_how_to_download(tiny, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    folder, _ = tiny("gpt2")
    cache = fake_hub_cache(tmp_path, "openai-community/gpt2", {"c" * 40: folder}, {"main": "c" * 40})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--openai-community--gpt2" / "snapshots" / ("c" * 40)
    assert resolve_model_path("openai-community/gpt2") == snapshot
    assert resolve_model_path("openai-community/gpt2", "c" * 40).name == "c" * 40

    message = load_error("facebook/opt-125m")
    assert str(cache) in message and message.endswith("download it first with: hf download facebook/opt-125m")
    assert "hf download openai-community/gpt2 --revision v9" in load_error("openai-community/gpt2", revision="v9")


def test_missing_tokenizer_is_one_line_that_suggests_the_flag(tiny, tmp_path) -> None:
    folder, _ = tiny("opt")
    shutil.copy(folder / "config.json", tmp_path)
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer files .*; pass one with --tokenizer$"):
        load_tokenizer(EngineConfig(model=str(tmp_path)))
    assert len(load_tokenizer(EngineConfig(model=str(tmp_path), tokenizer=str(folder)))) > 2


def test_auto_dtype_is_fp32_on_cpu_and_the_checkpoints_half_dtype_on_gpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", gpu, torch.float16) == torch.float16
    assert resolve_dtype("auto", gpu, torch.float32) == torch.bfloat16
    assert resolve_dtype("auto", gpu, None) == torch.bfloat16  # GGUF
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype 'fp8' is not one of auto"):
        resolve_dtype("fp8", cpu)


# ---- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_gpu_fp32_tokens_and_logits_and_bf16_logits(family, tiny, tokenizer) -> None:
    folder, hf_model = tiny(family)
    hf_model = on_device(hf_model, "cuda")
    prompts = random_prompts(len(tokenizer))
    runner = make_runner(str(folder), device="cuda", dtype="float32")
    assert runner_greedy(runner, prompts) == hf_greedy(hf_model, prompts)
    assert relative_error(runner_last_logits(runner, prompts), hf_last_logits(hf_model, prompts)) < FP32_LOGITS_RTOL
    folder, hf_model = tiny(family, REAL_INIT)
    assert_bf16_logits_near_fp32(folder, hf_model, len(tokenizer), "cuda")


@pytest.mark.gpu
def test_llm_on_gpu_profiles_memory_and_matches_transformers(tiny, tokenizer) -> None:
    from frontend import LLM, SamplingParams

    folder, hf_model = tiny("qwen3")
    prompts = random_prompts(len(tokenizer))
    expected = hf_greedy(on_device(hf_model, "cuda"), prompts)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS)
    with LLM(str(folder), dtype="float32", gpu_memory_utilization=0.3) as llm:
        outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # The whole pipeline on the CPU reference path gives the same tokens.
    with LLM(str(folder), dtype="float32", device="cpu") as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_runner_greedy_with_cuda_graphs_and_eager_equals_cpu_fp32(family, tiny, tokenizer) -> None:
    """float32, greedy: decode steps replayed from CUDA graphs (batches padded to a captured
    size), eager CUDA, the CPU reference path, and prefill steps replayed from graphs too
    (--cuda-graph-mixed-tokens) give the same tokens."""
    folder, _ = tiny(family)
    prompts = random_prompts(len(tokenizer))
    graphs = make_runner(str(folder), device="cuda")
    decode_sizes = graphs.graphs.sizes("decode")
    assert decode_sizes and len(prompts) not in decode_sizes  # so the batch is padded
    assert graphs.max_num_batched_tokens == 8192  # left unset: the GPU's default
    tokens = runner_greedy(graphs, prompts)
    del graphs
    assert runner_greedy(make_runner(str(folder), device="cuda", enforce_eager=True), prompts) == tokens
    assert runner_greedy(make_runner(str(folder), device="cpu"), prompts) == tokens
    # The prefill step (60 tokens) replayed from a graph of 64 tokens over every sequence slot.
    mixed = make_runner(str(folder), device="cuda", cuda_graph_mixed_tokens=64)
    assert mixed.graphs.sizes("mixed") == [16, 32, 64]
    assert runner_greedy(mixed, prompts) == tokens


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["1", "auto"])
def test_skinny_linear_in_the_model_on_gpu(family, mode, tiny, tokenizer, monkeypatch) -> None:
    """PAGODA_SKINNY_LINEAR: a step of at most 16 rows (here 4 prompts of 3 tokens) runs the
    projections through the Triton kernel ("1": every one and the lm_head; "auto": those with at
    most 4,096 outputs, i.e. all of the tiny model's); its bf16 logits equal cuBLAS's ("0")
    within bf16 rounding."""
    import kernels

    folder, _ = tiny(family)
    prompts = random_prompts(len(tokenizer), lengths=(3, 3, 3, 3))
    runner = make_runner(str(folder), device="cuda", dtype="bfloat16", enforce_eager=True)
    monkeypatch.setattr(kernels, "_SKINNY_LINEAR", "0")
    cublas = runner_last_logits(runner, prompts)
    calls = []
    monkeypatch.setattr(kernels, "_SKINNY_LINEAR", mode)
    from kernels import triton_linear

    real = triton_linear.linear_skinny_triton
    monkeypatch.setattr(triton_linear, "linear_skinny_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours = runner_last_logits(runner, prompts)
    assert len(calls) >= 4 * runner.model.config.num_hidden_layers  # qkv, o, gate_up, down of every layer
    assert relative_error(ours, cublas) < 2e-2
