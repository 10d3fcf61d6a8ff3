"""FP8 linears (W8A8) in the model: `--quantization fp8` on a 16/32-bit checkpoint, and FP8
checkpoints (compressed-tensors, fbgemm_fp8, fp8) read as stored.

The truth for the arithmetic is transformers itself with its decoder linears fake-quantized by
this file's own code (the weights replaced by their dequantized e4m3 values, each linear's
input quantized per token, or by its static scale, and dequantized): Pagoda's logits match it
to fp32 rounding. Against the unquantized model the error is FP8's own (measured below). The
checkpoints are written here from a tiny transformers model, quantized by this file, in each
format's real layout (tensor names, scale shapes, config.json's quantization_config).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gpu_worker.layers import MergedLinear, RowParallelLinear
from gpu_worker.loader import ModelLoadError
from gpu_worker.parallel import set_tensor_parallel
from gpu_worker.weight_source import WeightSource
from kernels.fp8_linear import Fp8Weight
from tests.model_check import make_runner, random_prompts, relative_error, runner_greedy, runner_last_logits
from tests.tiny_models import REAL_INIT

E4M3 = torch.float8_e4m3fn
PROMPT_LENGTHS = (17, 40, 33)
LAST = 16  # positions compared per prompt
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STACKED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
# Pagoda against transformers fake-quantized alike: only the order of fp32 sums differs (measured
# 2e-6 to 2e-7), which could move a value across an e4m3 rounding boundary downstream (one step
# of one element, ~1e-4 of the logits): the bound leaves room for that.
FAKE_QUANT_RTOL = 2e-3
# FP8 against the unquantized model (REAL_INIT weights; relative to the row's largest logit).
# Measured: llama 0.077 (max |diff| 0.035 on logits up to 0.6), qwen2 0.031; the W8A8 error of
# one random matmul alone is ~5% (e4m3 keeps 3 mantissa bits).
FP8_VS_FULL_RTOL = 0.15


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---- this file's own FP8 (independent of kernels/fp8_linear.py) ----------------------------


def to_e4m3(w: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale [rows, 1] or [1]): amax / 448 per row or per tensor."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax().reshape(1)
    scale = (amax / 448).clamp_min(1 / (448 * 512))
    return (w / (scale if per_row else scale[0])).clamp(-448, 448).to(E4M3), scale


def fake_quantized(hf_model: nn.Module, plans: dict[str, dict]) -> nn.Module:
    """A copy of transformers' model with linear `name` running W8A8 as plans[name] says: "w" its
    e4m3 weight and "scale" ([rows, 1] or [1]); "input": None for per token (under "ub" if
    given), else a static scale."""
    hf_model = copy.deepcopy(hf_model)
    modules = dict(hf_model.named_modules())
    for name, plan in plans.items():
        linear = modules[name]
        with torch.no_grad():
            linear.weight.copy_(plan["w"].float() * plan["scale"])

        def quantize_input(module, args, plan=plan):
            (x,) = args
            if plan.get("input") is not None:
                s = plan["input"]
            else:
                amax = x.abs().amax(-1, keepdim=True)
                if plan.get("ub") is not None:
                    amax = amax.clamp_max(plan["ub"])
                s = (amax / 448).clamp_min(1 / (448 * 512))
            return ((x / s).clamp(-448, 448).to(E4M3).float() * s,)

        linear.register_forward_pre_hook(quantize_input)
    return hf_model


def decoder_linears(hf_model: nn.Module) -> list[str]:
    return [n for n, m in hf_model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in LINEARS]


def hf_logits(hf_model: nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """The last LAST positions' logits of each prompt, as `runner_last_logits(last=LAST)` orders them."""
    with torch.inference_mode():
        return torch.cat([hf_model(torch.tensor([p])).logits[0, -LAST:].float() for p in prompts])


def runner_logits(folder: Path, prompts: list[list[int]], **kw: object) -> tuple[torch.Tensor, object]:
    runner = make_runner(str(folder), **kw)
    return runner_last_logits(runner, prompts, last=LAST), runner


def fp8_layer_count(runner) -> int:
    return sum(getattr(m, "fp8", None) is not None for m in runner.model.modules())


def write_fp8_checkpoint(
    folder: Path, out: Path, quantization_config: dict, tensors: dict[str, torch.Tensor]
) -> Path:
    """`folder`'s model with `tensors` replacing / adding to its weights, and quantization_config."""
    out.mkdir()
    state = {**load_file(str(folder / "model.safetensors")), **tensors}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["dtype"] = "bfloat16"  # as the hub's FP8 checkpoints say (the unquantized tensors' dtype)
    (out / "config.json").write_text(json.dumps(config))
    return out


def compressed_tensors_config(strategy: str, activations: dict | None, **extra: object) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                      "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        **extra,
    }


DYNAMIC_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
STATIC_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@pytest.fixture(scope="module")
def llama(tiny):
    """The tiny Llama 3 (GQA, 3 layers, untied head) at a trained model's weight scale."""
    return tiny("llama", REAL_INIT)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return random_prompts(len(tokenizer), PROMPT_LENGTHS)


# ---- --quantization fp8 -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases through the fp8 matmul
def test_quantization_fp8_is_transformers_with_fake_quantized_linears(family, tiny, prompts) -> None:
    folder, hf_model = tiny(family, REAL_INIT)
    ours, runner = runner_logits(folder, prompts, quantization="fp8")
    assert fp8_layer_count(runner) == 4 * hf_model.config.num_hidden_layers  # qkv, o, gate_up, down
    kept = [m for m in runner.model.modules() if isinstance(m, (MergedLinear, RowParallelLinear))]
    assert all(m.weight is None for m in kept)  # the fp32 weights are gone
    full, _ = runner_logits(folder, prompts)
    modules = dict(hf_model.named_modules())
    plans = {n: dict(zip(("w", "scale"), to_e4m3(modules[n].weight))) for n in decoder_linears(hf_model)}
    assert relative_error(ours, hf_logits(fake_quantized(hf_model, plans), prompts)) < FAKE_QUANT_RTOL
    assert relative_error(ours, full) < FP8_VS_FULL_RTOL
    # Top-1 agreement with the unquantized model: wherever its best logit leads by more than
    # twice the largest change FP8 makes to any logit, the argmax cannot move.
    diff = (ours - full).abs().amax().item()
    top2 = full.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert (ours.argmax(-1) == full.argmax(-1))[clear].all()


def test_dummy_weights_are_quantized_too(llama) -> None:
    runner = make_runner(str(llama[0]), quantization="fp8", load_format="dummy")
    assert fp8_layer_count(runner) == 12


def test_fp8_lm_head_is_transformers_with_its_lm_head_fake_quantized_too(llama, tiny, prompts, caplog) -> None:
    """--fp8-lm-head: the untied LM head in e4m3 with a scale per vocabulary row, the 16/32-bit
    matrix dropped; the logits are transformers' with every decoder linear and the LM head
    fake-quantized alike, and not those of --quantization fp8 alone. Refused without FP8
    weights; a tied head (the embedding's matrix) is left as it is, with a warning."""
    folder, hf_model = llama
    ours, runner = runner_logits(folder, prompts, quantization="fp8", fp8_lm_head=True)
    head = runner.model.output_layer()
    assert head.fp8 is not None and head.weight is None
    assert head.fp8.weight.shape == (hf_model.config.vocab_size, hf_model.config.hidden_size)
    modules = dict(hf_model.named_modules())
    plans = {n: dict(zip(("w", "scale"), to_e4m3(modules[n].weight))) for n in [*decoder_linears(hf_model), "lm_head"]}
    assert relative_error(ours, hf_logits(fake_quantized(hf_model, plans), prompts)) < FAKE_QUANT_RTOL
    head_16bit, _ = runner_logits(folder, prompts, quantization="fp8")
    assert relative_error(ours, head_16bit) > 10 * FAKE_QUANT_RTOL  # the head's own FP8 error
    assert relative_error(ours, head_16bit) < FP8_VS_FULL_RTOL

    assert "fp8_lm_head needs FP8 weights (--quantization fp8, or an FP8 checkpoint)" in load_error(
        folder, fp8_lm_head=True)
    tied_folder, _ = tiny("qwen2", REAL_INIT)
    with caplog.at_level("WARNING", logger="gpu_worker.fp8"):
        tied = make_runner(str(tied_folder), quantization="fp8", fp8_lm_head=True)
    assert tied.model.output_layer().fp8 is None and tied.model.output_layer().weight is not None
    assert "the LM head is tied to the embedding" in caplog.text


# ---- tensor parallelism: each rank quantizes its shard --------------------------------------


@pytest.fixture
def as_rank():
    yield set_tensor_parallel
    set_tensor_parallel(0, 1)


def test_each_rank_quantizes_its_shard(as_rank) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8, 32), torch.randn(4, 32)  # two stacked projections
    whole = Fp8Weight.quantize(torch.cat([q, k]))
    for rank in range(2):
        as_rank(rank, 2)
        column = MergedLinear(32, [8, 4], bias=False)
        column.load_param("weight", WeightSource(q), 0)
        column.load_param("weight", WeightSource(k), 1)
        column.quantize_fp8()
        # A rank's rows (4 of q, 2 of k) get the very values and scales of the whole matrix's.
        rows = torch.cat([torch.arange(rank * 4, rank * 4 + 4), 8 + torch.arange(rank * 2, rank * 2 + 2)])
        assert torch.equal(column.fp8.weight.view(torch.uint8), whole.weight[rows].view(torch.uint8))
        assert torch.equal(column.fp8.scale, whole.scale[:, rows])
        # A row-parallel rank quantizes its own input columns (scales of its part of each row).
        w = torch.randn(6, 32)
        row = RowParallelLinear(32, 6, bias=False)
        row.load_param("weight", WeightSource(w), None)
        row.quantize_fp8()
        own = Fp8Weight.quantize(w[:, rank * 16 : rank * 16 + 16])
        assert torch.equal(row.fp8.weight.view(torch.uint8), own.weight.view(torch.uint8))
        assert torch.equal(row.fp8.scale, own.scale)


def test_a_rank_reads_its_rows_of_each_parts_checkpoint_scales(as_rank) -> None:
    as_rank(1, 2)
    layer = MergedLinear(16, [8, 4, 4], bias=False)  # q/k/v: rank 1 keeps q rows 4..7, k and v rows 2..3
    layer.expect_fp8(static_input=True)
    q = torch.arange(8, dtype=torch.float32)[:, None] + 1  # per channel, [rows, 1]
    layer.load_param("weight_scale", WeightSource(q), 0)
    layer.load_param("weight_scale", WeightSource(torch.tensor([7.0])), 1)  # per tensor, [1]
    layer.load_param("weight_scale", WeightSource(torch.tensor(9.0)), 2)  # per tensor, []
    for part, scale in enumerate((0.5, 0.25, 0.75)):
        layer.load_param("input_scale", WeightSource(torch.tensor([scale])), part)
    assert layer.weight_scale.tolist() == [5, 6, 7, 8, 7, 7, 9, 9]
    layer.weight.data.zero_()
    layer.finish_fp8()
    assert layer.fp8.scale.tolist() == [[5, 6, 7, 8, 7, 7, 9, 9]] and layer.fp8.input_scale.item() == 0.75
    layer = MergedLinear(16, [8, 4, 4], bias=False)
    layer.expect_fp8(static_input=False)
    with pytest.raises(ValueError, match=r"has shape \[4\], expected \[\], \[1\], \[8\] or \[8, 1\]"):
        layer.load_param("weight_scale", WeightSource(torch.ones(4)), 0)  # q's scales are for its 8 rows


# ---- FP8 checkpoints ----------------------------------------------------------------------------


def test_compressed_tensors_per_channel_dynamic_equals_quantization_fp8(llama, prompts, tmp_path) -> None:
    """llm-compressor's FP8_DYNAMIC: e4m3 weights, a scale per channel [rows, 1], activations per
    token, the LM head ignored. The same values --quantization fp8 makes, so the same logits
    exactly; the KV-cache scales it may carry are skipped."""
    folder, hf_model = llama
    modules, tensors = dict(hf_model.named_modules()), {}
    for name in decoder_linears(hf_model):
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = to_e4m3(modules[name].weight)
    for layer in range(hf_model.config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(1.0)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(1.0)
    config = compressed_tensors_config("channel", DYNAMIC_TOKEN)
    checkpoint = write_fp8_checkpoint(folder, tmp_path / "ct", config, tensors)
    ours, runner = runner_logits(checkpoint, prompts)  # --quantization unset: the checkpoint's FP8
    assert fp8_layer_count(runner) == 12
    quantized, _ = runner_logits(folder, prompts, quantization="fp8")
    assert torch.equal(ours, quantized)
    assert torch.equal(runner_logits(checkpoint, prompts, quantization="fp8")[0], ours)


def test_fbgemm_fp8_with_modules_not_converted_and_a_scale_bound(llama, prompts, tmp_path) -> None:
    """Meta's fbgemm_fp8 (Llama 3.1 405B FP8): scales [rows, 1], per-token activations whose
    amax is bounded by activation_scale_ub, modules_to_not_convert kept in 16 bits."""
    folder, hf_model = llama
    modules = dict(hf_model.named_modules())
    not_converted = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj", "lm_head"]
    ub = 0.5  # low enough to clip these activations (the real checkpoints' is 1200)
    tensors, plans = {}, {}
    for name in decoder_linears(hf_model):
        if name in not_converted:
            continue
        w, scale = to_e4m3(modules[name].weight)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = w, scale
        plans[name] = {"w": w, "scale": scale, "ub": ub}
    config = {"quant_method": "fbgemm_fp8", "activation_scale_ub": ub, "modules_to_not_convert": not_converted}
    checkpoint = write_fp8_checkpoint(folder, tmp_path / "fbgemm", config, tensors)
    ours, runner = runner_logits(checkpoint, prompts)
    assert fp8_layer_count(runner) == 10
    assert relative_error(ours, hf_logits(fake_quantized(hf_model, plans), prompts)) < FAKE_QUANT_RTOL
    # The bound clipped something: without it the numbers differ.
    unbounded = fake_quantized(hf_model, {n: {**p, "ub": None} for n, p in plans.items()})
    assert relative_error(ours, hf_logits(unbounded, prompts)) > 10 * FAKE_QUANT_RTOL


@pytest.mark.parametrize("method", ["compressed-tensors", "fp8"])
def test_per_tensor_weights_with_static_input_scales(method, llama, prompts, tmp_path) -> None:
    """Per-tensor weight scales and static per-tensor input scales: compressed-tensors'
    FP8 (strategy tensor, shapes [1]) and AutoFP8's / vLLM's "fp8" (activation_scheme static,
    scalar shapes []). Stacked q/k/v and gate/up keep each part's weight scale on its rows and
    share the largest input scale."""
    folder, hf_model = llama
    modules = dict(hf_model.named_modules())
    tensors, plans, input_scales = {}, {}, {}
    for i, name in enumerate(decoder_linears(hf_model)):
        w, scale = to_e4m3(modules[name].weight, per_row=False)
        input_scales[name] = torch.tensor([0.002 + 0.0005 * (i % 3)])  # parts differ: the largest is used
        shape = (1,) if method == "compressed-tensors" else ()
        tensors[f"{name}.weight"] = w
        tensors[f"{name}.weight_scale"] = scale.reshape(shape)
        tensors[f"{name}.input_scale"] = input_scales[name].reshape(shape)
        plans[name] = {"w": w, "scale": scale}
    for name, plan in plans.items():  # the input scale of the stacked layer each belongs to
        layer, _, proj = name.rpartition(".")
        group = [f"{layer}.{p}" for p, g in STACKED.items() if g == STACKED.get(proj)] or [name]
        plan["input"] = max(input_scales[n] for n in group)
    if method == "compressed-tensors":
        config = compressed_tensors_config("tensor", STATIC_TENSOR)
    else:
        config = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    checkpoint = write_fp8_checkpoint(folder, tmp_path / method, config, tensors)
    ours, runner = runner_logits(checkpoint, prompts)
    assert fp8_layer_count(runner) == 12
    assert all(m.fp8.input_scale is not None for m in runner.model.modules() if getattr(m, "fp8", None) is not None)
    assert relative_error(ours, hf_logits(fake_quantized(hf_model, plans), prompts)) < FAKE_QUANT_RTOL


# ---- what is refused -----------------------------------------------------------------------------


def load_error(model: Path, **kw: object) -> str:
    with pytest.raises(ModelLoadError) as info:
        make_runner(str(model), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unsupported_quantization_configs_name_what_is_wrong(llama, tmp_path) -> None:
    folder, hf_model = llama
    bnb = write_fp8_checkpoint(folder, tmp_path / "bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True}, {})
    assert "quantization_config quant_method 'bitsandbytes' is not supported (supported: FP8 checkpoints of " \
        "compressed-tensors, fbgemm_fp8, fp8; 4-bit ones of gptq, awq)" in load_error(bnb)
    block_wise = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    blocks = write_fp8_checkpoint(folder, tmp_path / "block", block_wise, {})
    assert "weight_block_size [128, 128] (block-wise FP8) is not supported" in load_error(blocks)
    int8 = compressed_tensors_config("channel", DYNAMIC_TOKEN)
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    message = load_error(write_fp8_checkpoint(folder, tmp_path / "int8", int8, {}))
    assert "group_0's weights (num_bits 8, type int, strategy channel) are not supported" in message

    # An FP8 checkpoint whose q projection has scales and k, v none; and --quantization none.
    w, scale = to_e4m3(hf_model.model.layers[0].self_attn.q_proj.weight)
    q_only = {"model.layers.0.self_attn.q_proj.weight": w, "model.layers.0.self_attn.q_proj.weight_scale": scale}
    partial = write_fp8_checkpoint(folder, tmp_path / "partial", compressed_tensors_config("channel", DYNAMIC_TOKEN),
                                   q_only)
    assert "model.layers.0.self_attn.qkv_proj: only some of its stacked projections have FP8" in load_error(partial)
    assert "the checkpoint is FP8 (compressed-tensors); --quantization none is not supported" in load_error(
        partial, quantization="none")
    assert "quantization 'int4' is not one of gguf, none, fp8" in load_error(folder, quantization="int4")


# ---- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantization_fp8_on_gpu_runs_scaled_mm_in_cuda_graphs(family, tiny, prompts, monkeypatch) -> None:
    """bf16 on the GPU, --quantization fp8: `_scaled_mm` and the W8A16 kernel (captured in the decode graphs too)
    against the CPU's fp32 reference of the same FP8 model and against the unquantized bf16
    model. bf16 activations move some values across e4m3 rounding boundaries, so both differ by
    FP8's own error (the CPU in bf16 measures 0.03-0.06 against fp32 activations, 0.03-0.09
    against unquantized bf16, with 44-48 of 48 argmaxes equal)."""
    import kernels.triton_fp8_linear as triton_fp8

    folder, _ = tiny(family, REAL_INIT)
    calls, skinny = [], []
    real, real_skinny = torch._scaled_mm, triton_fp8.fp8_linear_skinny_triton
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(triton_fp8, "fp8_linear_skinny_triton",
                        lambda *a, **kw: skinny.append(1) or real_skinny(*a, **kw))
    runner = make_runner(str(folder), device="cuda", dtype="bfloat16", quantization="fp8")
    # FP8 matmuls captured in the decode graphs (<= 16 rows: the W8A16 kernel).
    assert runner.graphs.sizes("decode") and skinny
    assert fp8_layer_count(runner) == 4 * runner.model.config.num_hidden_layers
    calls.clear()
    ours = runner_last_logits(runner, prompts, last=LAST)
    assert calls  # the prompts' prefill (90 rows): W8A8 through `_scaled_mm`
    tokens = runner_greedy(runner, prompts, 8)  # decode steps replayed from the graphs
    assert all(len(t) == 8 for t in tokens)
    del runner
    cpu, _ = runner_logits(folder, prompts, quantization="fp8")
    assert relative_error(ours, cpu) < FP8_VS_FULL_RTOL
    full, _ = runner_logits(folder, prompts, device="cuda", dtype="bfloat16", enforce_eager=True)
    assert relative_error(ours, full) < FP8_VS_FULL_RTOL
    assert (ours.argmax(-1) == full.argmax(-1)).float().mean() >= 0.8


@pytest.mark.gpu
def test_fp8_lm_head_on_gpu_through_the_gemv_in_cuda_graphs(llama, prompts) -> None:
    """--fp8-lm-head in bf16 on the GPU: the LM head's decode-sized logits through the FP8 GEMV
    (captured in the decode graphs), prefill's through `_scaled_mm`; against the CPU's fp32
    reference of the same FP8 model (FP8's own error apart, as the test above measures)."""
    folder, _ = llama
    runner = make_runner(str(folder), device="cuda", dtype="bfloat16", quantization="fp8", fp8_lm_head=True)
    assert runner.model.output_layer().fp8 is not None and runner.graphs.sizes("decode")
    ours = runner_last_logits(runner, prompts, last=LAST)
    tokens = runner_greedy(runner, prompts, 8)
    assert all(len(t) == 8 for t in tokens)
    del runner
    cpu, _ = runner_logits(folder, prompts, quantization="fp8", fp8_lm_head=True)
    assert relative_error(ours, cpu) < FP8_VS_FULL_RTOL
    assert (ours.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.8
