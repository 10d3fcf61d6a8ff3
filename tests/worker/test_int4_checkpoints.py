"""GPTQ and AWQ checkpoints (gpu_worker/int4.py) run as W4A16 (kernels/int4_linear.py).

The checkpoints are written here from a tiny transformers model, quantized by this file's own
round-to-nearest (independent of kernels/int4_linear.py), in each format's real layout: GPTQ's
qweight packed along the input rows, its qzeros along the columns (v1 storing zero - 1), fp16
scales, g_idx (act-order: the groups follow a permutation of the input rows, the same one for
projections sharing an input, as GPTQ's Hessian order is); AWQ's qweight and qzeros packed along
the columns in AutoAWQ's nibble order. The truth is transformers with each linear's weight
replaced by its dequantized values: Pagoda's fp32 logits equal it to fp32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gpu_worker.int4 import AWQ_ORDER
from gpu_worker.layers import MergedLinear, RowParallelLinear
from gpu_worker.loader import ModelLoadError
from gpu_worker.parallel import set_tensor_parallel
from gpu_worker.weight_source import WeightSource
from tests.model_check import make_runner, random_prompts, relative_error, runner_last_logits
from tests.tiny_models import REAL_INIT

PROMPT_LENGTHS = (17, 40, 33)
LAST = 16
GROUP = 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
# Pagoda against transformers on the dequantized weights: only the order of fp32 sums differs.
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---- this file's own 4-bit quantization and packing ---------------------------------------------


def quantize(w: torch.Tensor, g_idx: torch.Tensor, num_groups: int, sym: bool):
    """nn.Linear weight [N, K] -> (q [K, N] 0..15, scales [G, N] fp16, zeros [G, N] int): round to
    nearest per group of input rows (row k in group g_idx[k])."""
    wt = w.detach().float().t()  # [K, N]
    scales = torch.empty(num_groups, wt.shape[1])
    zeros = torch.empty(num_groups, wt.shape[1], dtype=torch.int64)
    for g in range(num_groups):
        rows = wt[g_idx == g]
        if sym:
            s = rows.abs().amax(0) * 2 / 15
            z = torch.full_like(s, 8, dtype=torch.int64)
        else:
            lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            s = (hi - lo) / 15
            # (1..15: GPTQ v1 stores zero - 1, and a zero of 0 would come back as 16)
            z = torch.round(-lo / s).long().clamp(1, 15)
        scales[g], zeros[g] = s.half().float(), z  # the checkpoint stores fp16 scales
    q = torch.round(wt / scales[g_idx] + zeros[g_idx]).clamp(0, 15).long()
    return q, scales.half(), zeros


def dequantized(q, scales, zeros, g_idx) -> torch.Tensor:
    """[N, K] as nn.Linear holds it."""
    return ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t()


def pack(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """0..15 values -> int32, eight per element along `dim`: nibble i holds index 8c + order[i]."""
    v = (values.long() & 0xF).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    packed = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, j in enumerate(order):
        packed |= v[..., j] << (4 * i)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # int32's two's complement
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def write_checkpoint(folder: Path, out: Path, hf_model: nn.Module, method: str, sym: bool, act_order: bool):
    """`folder`'s model with every decoder linear in `method`'s 4-bit layout; returns (out, the
    transformers model with the dequantized weights)."""
    import copy

    gen = torch.Generator().manual_seed(7)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
    truth = copy.deepcopy(hf_model)
    perms: dict[tuple[int, str], torch.Tensor] = {}
    for name, module in truth.named_modules():
        leaf = name.rpartition(".")[2]
        if not isinstance(module, nn.Linear) or leaf not in LINEARS:
            continue
        k = module.in_features
        num_groups = k // GROUP
        g_idx = torch.arange(k) // GROUP
        if act_order:  # GPTQ's: row k's group is its position in a (shared) permutation // GROUP
            layer = int(name.split(".layers.")[1].split(".")[0])
            key = (layer, SHARED_INPUT.get(leaf, leaf))
            perm = perms.setdefault(key, torch.randperm(k, generator=gen))
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // GROUP
        q, scales, zeros = quantize(module.weight, g_idx, num_groups, sym)
        with torch.no_grad():
            module.weight.copy_(dequantized(q, scales, zeros, g_idx))
        del state[name + ".weight"]
        if method == "gptq":
            state[name + ".qweight"] = pack(q, 0)
            state[name + ".qzeros"] = pack(zeros - 1, 1)  # v1: zero - 1 (0 - 1 = 15 in 4 bits)
            state[name + ".g_idx"] = g_idx.to(torch.int32)
        else:
            state[name + ".qweight"] = pack(q, 1, AWQ_ORDER)
            state[name + ".qzeros"] = pack(zeros, 1, AWQ_ORDER)
        state[name + ".scales"] = scales
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order,
                                         "sym": sym, "checkpoint_format": "gptq", "true_sequential": True}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm",
                                         "zero_point": True, "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(config))
    return out, truth


@pytest.fixture(scope="module")
def llama(tiny):
    return tiny("llama", REAL_INIT)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return random_prompts(len(tokenizer), PROMPT_LENGTHS)


def hf_logits(hf_model: nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([hf_model(torch.tensor([p])).logits[0, -LAST:].float() for p in prompts])


def w4_count(runner) -> int:
    return sum(getattr(m, "w4", None) is not None for m in runner.model.modules())


@pytest.mark.parametrize(
    ("method", "sym", "act_order"),
    [("gptq", True, False), ("gptq", False, True), ("awq", False, False)],
    ids=["gptq-sym", "gptq-asym-act-order", "awq"],
)
def test_int4_checkpoint_is_transformers_on_its_dequantized_weights(method, sym, act_order, llama, prompts, tmp_path):
    folder, hf_model = llama
    checkpoint, truth = write_checkpoint(folder, tmp_path / method, hf_model, method, sym, act_order)
    runner = make_runner(str(checkpoint))
    assert w4_count(runner) == 4 * hf_model.config.num_hidden_layers  # qkv, o, gate_up, down
    layers = [m for m in runner.model.modules() if isinstance(m, (MergedLinear, RowParallelLinear))]
    assert all(m.weight is None for m in layers)
    # act-order keeps g_idx on the layers whose input rows are permuted; plain groups drop it.
    assert all((m.w4.g_idx is not None) == act_order for m in layers)
    ours = runner_last_logits(runner, prompts, last=LAST)
    assert relative_error(ours, hf_logits(truth, prompts)) < RTOL
    # And --quantization naming the method is the same load.
    named = make_runner(str(checkpoint), quantization=method)
    assert torch.equal(runner_last_logits(named, prompts, last=LAST), ours)


def load_error(model: Path, **kw: object) -> str:
    with pytest.raises(ModelLoadError) as info:
        make_runner(str(model), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_what_is_refused(llama, tmp_path) -> None:
    folder, hf_model = llama
    checkpoint, _ = write_checkpoint(folder, tmp_path / "gptq", hf_model, "gptq", True, False)
    assert "the checkpoint is GPTQ (4-bit); --quantization fp8 is not supported for it" in load_error(
        checkpoint, quantization="fp8")
    assert "--quantization gptq needs a GPTQ checkpoint" in load_error(folder, quantization="gptq")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert "quant_method 'gptq' with bits 8 is not supported (4 bits)" in load_error(checkpoint)
    # A checkpoint quantizing q but not k and v.
    partial = tmp_path / "partial"
    partial.mkdir()
    state = load_file(str(checkpoint / "model.safetensors"))
    for t in ("qweight", "qzeros", "scales", "g_idx"):
        for proj in ("k_proj", "v_proj"):
            del state[f"model.layers.0.self_attn.{proj}.{t}"]
    for proj in ("k_proj", "v_proj"):
        state[f"model.layers.0.self_attn.{proj}.weight"] = dict(hf_model.named_parameters())[
            f"model.layers.0.self_attn.{proj}.weight"].detach().clone()
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"]["bits"] = 4
    (partial / "config.json").write_text(json.dumps(config))
    assert "model.layers.0.self_attn.qkv_proj: only some of its stacked projections are 4-bit" in load_error(partial)


def test_dummy_weights_under_quantization_gptq_are_quantized_at_load(llama) -> None:
    runner = make_runner(str(llama[0]), quantization="gptq", load_format="dummy")
    assert w4_count(runner) == 4 * llama[1].config.num_hidden_layers


@pytest.fixture
def as_rank():
    yield set_tensor_parallel
    set_tensor_parallel(0, 1)


def test_each_rank_takes_its_columns_and_input_rows(as_rank) -> None:
    """TP=2: a column-parallel rank keeps its columns of each stacked part; a row-parallel rank
    its input rows and their groups (with act-order: every group, its rows' g_idx)."""
    from gpu_worker.int4 import Int4Plan

    torch.manual_seed(0)
    k = 64
    plan = Int4Plan("gptq", GROUP, zero_offset=1)
    parts = [torch.randn(32, k), torch.randn(16, k)]  # [N, K] each
    for act_order in (False, True):
        g_idx = torch.arange(k) // GROUP
        if act_order:
            g_idx = g_idx[torch.randperm(k)]
        packed = []
        for w in parts:
            q, s, z = quantize(w, g_idx, k // GROUP, sym=False)
            packed.append((q, s, z, dequantized(q, s, z, g_idx)))
        for rank in range(2):
            as_rank(rank, 2)
            column = MergedLinear(k, [32, 16], bias=False)
            column.expect_int4(g_idx=True)
            for i, (q, s, z, _) in enumerate(packed):
                for name, t in (("qweight", pack(q, 0)), ("qzeros", pack(z - 1, 1)), ("scales", s),
                                ("g_idx", g_idx.to(torch.int32))):
                    column.load_param(name, WeightSource(t), i)
            column.finish_int4(plan, torch.float32)
            want = torch.cat([packed[0][3][rank * 16 : rank * 16 + 16], packed[1][3][rank * 8 : rank * 8 + 8]])
            assert torch.equal(column.w4.dequantize(), want)
            # Row-parallel (o / down): this rank's 32 input rows.
            q, s, z, full = packed[0]
            row = RowParallelLinear(k, 32, bias=False)
            row.expect_int4(g_idx=True)
            for name, t in (("qweight", pack(q, 0)), ("qzeros", pack(z - 1, 1)), ("scales", s),
                            ("g_idx", g_idx.to(torch.int32))):
                row.load_param(name, WeightSource(t), None)
            row.finish_int4(plan, torch.float32)
            assert torch.equal(row.w4.dequantize(), full[:, rank * 32 : rank * 32 + 32])
            assert (row.w4.g_idx is None) == (not act_order)
            if not act_order:
                assert row.w4.scales.shape[0] == 2  # its own 2 of the 4 groups


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_checkpoint_on_gpu_in_bf16_with_cuda_graphs(method, llama, prompts, tmp_path) -> None:
    """bf16 on the GPU: the W4A16 kernels (prefill and, captured in the decode graphs, decode)
    against the CPU's fp32 run of the same checkpoint."""
    from tests.model_check import runner_greedy

    folder, hf_model = llama
    checkpoint, _ = write_checkpoint(folder, tmp_path / method, hf_model, method, False, method == "gptq")
    runner = make_runner(str(checkpoint), device="cuda", dtype="bfloat16")
    assert w4_count(runner) == 4 * hf_model.config.num_hidden_layers and runner.graphs.sizes("decode")
    ours = runner_last_logits(runner, prompts, last=LAST)
    assert all(len(t) == 8 for t in runner_greedy(runner, prompts, 8))
    del runner
    cpu = runner_last_logits(make_runner(str(checkpoint)), prompts, last=LAST)
    assert relative_error(ours, cpu) < 0.05
    assert (ours.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.8


def test_a_draft_model_under_a_gptq_target_reads_its_own_format() -> None:
    """--quantization gptq names the target's checkpoint format: the draft worker's config leaves
    it unset (its own config.json decides), while fp8 (made at load) applies to both."""
    from gpu_worker.draft_service import draft_engine_config
    from protocol.config import EngineConfig
    from protocol.messages import DraftSetup

    spec = json.dumps({"method": "draft_model", "model": "draft", "num_speculative_tokens": 3})
    setup = DraftSetup(num_blocks=64, max_model_len=256, vocab_size=100)
    for quantization, drafts in (("gptq", None), ("awq", None), ("fp8", "fp8"), (None, None)):
        target = EngineConfig(model="target", quantization=quantization, speculative_config=spec)
        draft = draft_engine_config(target, setup)
        assert draft.model == "draft" and draft.quantization == drafts
