"""W4A16 linears (kernels/int4_linear.py): GPTQ's packing, round-to-nearest quantization within
half a step, the reference against fp64 on the dequantized weight (plain groups and act-order's
g_idx), and the Triton kernels against the reference: in Triton's CPU interpreter at small
shapes here (in this process when nothing compiled Triton before it, else in a fresh one), on
the GPU with `-m gpu` at llama3-8b's projection shapes and inside a CUDA graph."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # As in test_triton.py: Triton picks interpreting or compiling when a kernel module is
    # imported (its own library when triton is), so this must come before anything imports it.
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.int4_linear as int4_module  # noqa: E402
from kernels.int4_linear import (  # noqa: E402
    Int4GroupWeight,
    check_int4_weight,
    dequantize_int4,
    pack_int4_rows,
    unpack_int4_rows,
    w4a16_linear,
    w4a16_linear_ref,
)

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# The kernels' error against the reference, per unit of the output and of sum |x| |W|: the
# output rounded to the dtype (the interpreter truncates, up to one unit of the last place, the
# reference rounds to nearest) and, in the tensor-core kernel, each weight rounded to x's dtype
# (again one unit at most); fp32: the order of the sums.
EPS = {torch.float32: 2.0**-16, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def weight_matrix(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, k] with rows of different sizes and a few outliers (uneven groups)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]
    w[:, :: max(1, k // 5)] *= 6
    return w.to(dtype)


def act_order(weight: torch.Tensor, group_size: int, sym: bool, seed: int = 0) -> Int4GroupWeight:
    """GPTQ's act-order (desc_act): groups of `group_size` consecutive rows of a permutation of
    the input rows, g_idx[perm[i]] = i // group_size, the rows stored in their own order."""
    n, k = weight.shape
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)).to(weight.device)
    grouped = Int4GroupWeight.quantize(weight[:, perm], group_size, sym)  # its row i: input row perm[i]
    q = torch.empty(k, n, dtype=torch.int32, device=weight.device)
    q[perm] = unpack_int4_rows(grouped.qweight).to(torch.int32)
    g_idx = torch.empty(k, dtype=torch.int32, device=weight.device)
    g_idx[perm] = torch.arange(k, dtype=torch.int32, device=weight.device) // (k if group_size == -1 else group_size)
    return Int4GroupWeight(pack_int4_rows(q), grouped.scales, grouped.zeros, g_idx)


# ---- packing ---------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_is_gptq_layout() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 24), generator=g)
    q[7::8, ::2] = torch.randint(8, 16, (8, 12), generator=g)  # row 8i + 7 >= 8: bit 31 set
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (8, 24)
    assert bool((packed[:, ::2] < 0).all())
    # Element [i, n] is sum_j q[8i + j, n] << 4j, as an unsigned 32-bit word.
    words = (q.reshape(8, 8, 24) << (4 * torch.arange(8))[None, :, None]).sum(1)
    assert torch.equal(packed.long() & 0xFFFFFFFF, words)
    back = unpack_int4_rows(packed)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), q)
    extremes = torch.tensor([[15], [0], [0], [0], [0], [0], [0], [8]])  # 0x8000000F
    assert pack_int4_rows(extremes).item() == -(2**31) + 15
    assert torch.equal(unpack_int4_rows(pack_int4_rows(extremes.to(torch.uint8))).long(), extremes)
    for bad in (q[:60], q.float(), q[0]):
        with pytest.raises(ValueError):
            pack_int4_rows(bad)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4_rows(packed.long())


# ---- quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_quantize_then_dequantize_is_within_half_a_step(sym, group_size, dtype) -> None:
    n, k = 40, 256
    weight = weight_matrix(n, k, seed=1, dtype=dtype)
    size = k if group_size == -1 else group_size
    weight[3, :size] = 0  # an all-zero group (the whole row with one group)
    weight[5] = weight[5].abs()  # a group of one sign: asym's range still holds 0
    w = Int4GroupWeight.quantize(weight, group_size, sym=sym)
    assert (w.in_features, w.out_features, w.num_groups, w.group_size) == (k, n, k // size, size)
    assert w.qweight.shape == (k // 8, n) and w.scales.shape == w.zeros.shape == (k // size, n)
    assert w.scales.dtype == w.zeros.dtype == dtype and w.g_idx is None
    assert w.nbytes == k // 8 * n * 4 + 2 * (k // size) * n * w.scales.element_size()
    back = w.dequantize()
    assert back.shape == (n, k) and back.dtype == torch.float32
    step = w.scales.float().repeat_interleave(size, dim=0).t()  # each element's scale, [n, k]
    wf = weight.float()
    assert bool(((back - wf).abs() <= step / 2 * (1 + 2.0**-20)).all())
    assert not back[3, :size].any() and bool((w.scales.float() > 0).all())
    zeros = w.zeros.float()
    if sym:
        assert bool((zeros == 8).all())
        # GPTQ's rule: scale = 2 max|w| / 15 (rounded up to the dtype), zero 8.
        amax = wf.t().reshape(k // size, size, n).abs().amax(1)
        assert bool((w.scales.float()[amax > 0] >= (amax * 2 / 15)[amax > 0]).all())
        assert bool((w.scales.float() <= amax * 2 / 15 * (1 + 2.0**-7) + torch.finfo(dtype).tiny).all())
    else:
        assert bool((zeros == zeros.round()).all() and (zeros >= 0).all() and (zeros <= 15).all())
        assert bool((zeros[:, 5] == 0).all())  # min(w, 0) = 0: zero point 0
    q = unpack_int4_rows(w.qweight)
    assert int(q.max()) <= 15 and int(q.max()) == 15  # the range is used


def test_quantize_rejects_groups_that_do_not_divide() -> None:
    for k, group_size in ((100, 50), (64, 48), (64, 0)):
        with pytest.raises(ValueError, match="groups of"):
            Int4GroupWeight.quantize(torch.randn(8, k), group_size)
    with pytest.raises(ValueError, match="float weight"):
        Int4GroupWeight.quantize(torch.ones(8, 64, dtype=torch.int32), 32)


def test_act_order_helper_permutes_groups_only() -> None:
    weight = weight_matrix(24, 128, seed=2)
    w = act_order(weight, 32, sym=False, seed=3)
    assert w.g_idx.dtype == torch.int32 and w.group_size is None
    assert sorted(torch.bincount(w.g_idx.long()).tolist()) == [32] * 4
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w.dequantize()[:, perm], Int4GroupWeight.quantize(weight[:, perm], 32, sym=False).dequantize())


# ---- the reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("g_idx", [False, True], ids=["groups", "act_order"])
def test_reference_is_x_times_the_dequantized_weight(g_idx) -> None:
    n, k = 48, 256
    weight = weight_matrix(n, k, seed=4)
    w = act_order(weight, 64, sym=False) if g_idx else Int4GroupWeight.quantize(weight, 64, sym=False)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(5))  # leading dims kept
    bias = torch.randn(n, generator=torch.Generator().manual_seed(6))
    y = w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, w.g_idx, bias)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    exact = x.double() @ w.dequantize().double().t() + bias.double()
    scale = (x.double().abs() @ w.dequantize().double().abs().t()).max().item()
    assert (y.double() - exact).abs().max().item() <= 1e-6 * scale
    assert torch.equal(w(x, bias), y)  # the CPU: `Int4GroupWeight` runs the reference
    # bf16 activations: the same product rounded once to bf16.
    yb = w4a16_linear_ref(x.bfloat16(), w.qweight, w.scales, w.zeros, w.g_idx, bias.bfloat16())
    exact = x.bfloat16().double() @ w.dequantize().double().t() + bias.bfloat16().double()
    assert yb.dtype == torch.bfloat16
    assert bool(((yb.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6 * scale).all())
    if not g_idx:  # the plain groups spelled out as a g_idx: the same numbers
        plain = torch.arange(k, dtype=torch.int32) // 64
        assert torch.equal(w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, plain, bias), y)
        assert torch.equal(dequantize_int4(w.qweight, w.scales, w.zeros, plain), w.dequantize().t())


def test_weight_shapes_are_checked() -> None:
    w = Int4GroupWeight.quantize(torch.randn(16, 64), 32)
    check_int4_weight(w.qweight, w.scales, w.zeros, None)
    bad = (
        (w.qweight.long(), w.scales, w.zeros, None),  # not int32
        (w.qweight, w.scales[:, 1:], w.zeros, None),  # scales of 15 columns
        (w.qweight, w.scales, w.zeros.half(), None),  # zeros of another dtype
        (w.qweight, w.scales[:1].expand(3, 16), w.zeros[:1].expand(3, 16), None),  # 64 rows in 3 groups
        (w.qweight, w.scales, w.zeros, torch.zeros(63, dtype=torch.int32)),  # g_idx of 63 rows
    )
    for args in bad:
        with pytest.raises(ValueError):
            check_int4_weight(*args)
    with pytest.raises(ValueError, match="features"):
        w(torch.randn(2, 32))


def test_dispatch_takes_the_kernel_for_16_bit_cuda_inputs(monkeypatch) -> None:
    pytest.importorskip("triton")
    import kernels.triton_int4_linear as triton_module

    calls = []
    monkeypatch.setattr(triton_module, "w4a16_linear_triton", lambda *args: calls.append(args[0].dtype))
    w = Int4GroupWeight.quantize(torch.randn(16, 64), 32)
    x = torch.randn(3, 64)
    assert torch.equal(w4a16_linear(x.bfloat16(), w.qweight, w.scales, w.zeros),
                       w4a16_linear_ref(x.bfloat16(), w.qweight, w.scales, w.zeros)) and not calls  # the CPU
    monkeypatch.setattr(int4_module, "_use_triton", lambda t: True)  # as if on CUDA
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w(x.to(dtype))
    assert calls == [torch.bfloat16, torch.float16]  # fp32: the reference


# ---- the Triton kernels (the interpreter here; compiled on a GPU) -------------------------------------


def _interpreter_ready() -> bool:
    """False when something imported triton for compiling before this module set TRITON_INTERPRET
    (triton's own jit functions, `tl.cdiv` among them, then compile even in our fresh kernels)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import triton_int4_linear as t

    return all(isinstance(f, InterpretedFunction) for f in (standard.cdiv, t._w4a16_gemv_kernel, t._w4a16_dot_kernel))


IN_PROCESS = HAS_TRITON and (ON_GPU or _interpreter_ready())
triton_in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="no triton, or triton was imported for compiling earlier: see the fresh-process test"
)


@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON, reason="the Triton tests run in this process (or need triton)")
def test_triton_in_a_fresh_interpreter_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", os.path.abspath(__file__)],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def check_kernel(w: Int4GroupWeight, x: torch.Tensor, bias: torch.Tensor | None = None, config=None) -> None:
    """The Triton launcher against the reference: elementwise within EPS of (2 |ref| + sum |x| |W|
    + |bias|)."""
    from kernels.triton_int4_linear import w4a16_linear_triton

    out = w4a16_linear_triton(x, w.qweight, w.scales, w.zeros, w.g_idx, bias, config=config)
    ref = w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, w.g_idx, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    size = (x.double().abs() @ w.dequantize().double().abs().t()).reshape(out.shape)
    if bias is not None:
        size += bias.double().abs()
    bound = EPS[x.dtype] * (2 * ref.double().abs() + size) + 1e-30
    err = (out.double() - ref.double()).abs()
    assert not out.isnan().any() and bool((err <= bound).all()), (err / bound).max().item()


@triton_in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
def test_triton_kernels_match_the_reference(m, dtype) -> None:
    """The default tilings: the GEMV up to 4 rows, the tensor-core kernel past them; groups of
    32 (a scale row per packed word) and one group (per key tile), act-order's g_idx (per row)."""
    g = torch.Generator().manual_seed(m)
    # Each K and N; bf16 (the models' dtype) over one more pair (the interpreter is slow).
    shapes = ((64, 100), (256, 24)) + (((64, 24),) if dtype == torch.bfloat16 else ())
    for k, n in shapes:
        weight = weight_matrix(n, k, seed=k + n).to(DEVICE)
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        bias = torch.randn(n, generator=g).to(DEVICE, dtype)
        for w, b in ((Int4GroupWeight.quantize(weight, 32, sym=True), bias),
                     (Int4GroupWeight.quantize(weight, -1, sym=False), None),
                     (act_order(weight, 32, sym=False, seed=n), bias if m % 2 else None)):
            check_kernel(w, x, b)


@triton_in_process
def test_triton_kernels_at_other_tilings_and_edges() -> None:
    """Tiles smaller than the shapes (several row, column and key tiles, the row tiles grouped),
    K not a multiple of the key tile (masked words), a scale row per tile from groups wider than
    it, groups of 4 rows (a scale per row, no g_idx), leading dims, no rows."""
    from kernels.triton_int4_linear import Int4DotConfig, Int4GemvConfig, w4a16_linear_triton

    g = torch.Generator().manual_seed(7)
    dot = Int4DotConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, group_m=2)
    gemv = Int4GemvConfig(block_n=16, block_k=32, num_warps=2)
    cases = (  # (m, k, n, group size, act-order, config)
        (70, 128, 72, 64, False, dot),  # 5 x 3 tiles; a scale row per 32-key tile
        (70, 72, 40, 24, False, dot),  # K = 72: the last key tile masked; a scale row per word
        (33, 64, 40, 4, False, dot),  # a scale per row
        (20, 200, 48, -1, True, None),  # K = 200 under 64-key tiles, act-order
        (5, 72, 40, 24, False, gemv),  # the GEMV's last key tile masked
        (16, 128, 40, 64, False, gemv),
        (2, 64, 24, 4, False, gemv),
        (7, 200, 56, 8, True, None),
        (2, 64, 24, 32, False, dot),  # two rows through the tensor-core kernel
    )
    for m, k, n, size, ordered, cfg in cases:
        weight = weight_matrix(n, k, seed=m)
        w = act_order(weight, size, sym=True, seed=m) if ordered else Int4GroupWeight.quantize(weight, size, sym=False)
        w = Int4GroupWeight(*(t.to(DEVICE) if t is not None else None for t in (w.qweight, w.scales, w.zeros, w.g_idx)))
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
            check_kernel(w, x, torch.randn(n, generator=g).to(DEVICE, dtype) if m % 2 else None, cfg)
    w = Int4GroupWeight.quantize(weight_matrix(24, 64).to(DEVICE), 32)
    x = torch.randn(2, 3, 64, generator=g).to(DEVICE, torch.bfloat16)
    assert w4a16_linear_triton(x, w.qweight, w.scales, w.zeros).shape == (2, 3, 24)
    empty = w4a16_linear_triton(x[:0], w.qweight, w.scales, w.zeros)
    assert empty.shape == (0, 3, 24)
    with pytest.raises(ValueError, match="at most 16 rows"):
        w4a16_linear_triton(torch.zeros(17, 64, device=DEVICE), w.qweight, w.scales, w.zeros, config=gemv)
    with pytest.raises(ValueError, match="activations"):
        w4a16_linear_triton(torch.zeros(1, 64, device=DEVICE, dtype=torch.float64), w.qweight, w.scales, w.zeros)


# ---- compiled for sm_90, here -------------------------------------------------------------------------

COMPILED = """
import sys
sys.path.insert(0, "scripts")
import triton
from kernel_resources import compile_kernel, report
from kernels import triton_int4_linear as t
ptrs = dict(x_ptr="bf16", qw_ptr="i32", s_ptr="bf16", z_ptr="bf16", g_ptr="i32", b_ptr="bf16", out_ptr="bf16")
for groups, m in ((0, 1), (1, 1), (2, 1), (0, 16), (2, 16)):
    cfg = t.gemv_config(m, 4096, 4096, lean=False)
    c = compile_kernel(t._w4a16_gemv_kernel, dict(
        GROUPS=groups, HAS_G_IDX=groups == 2, HAS_BIAS=True, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=True, PDL=True), ptrs, num_warps=cfg.num_warps, aligned=True)
    ptx = c.asm["ptx"]
    print("gemv", groups, m, report(c), 0 <= ptx.find("ld.global") < ptx.find("griddepcontrol.wait"))
for groups, m in ((0, 300), (1, 300), (2, 300), (1, 16), (2, 16), (0, 2048)):
    cfg = t.dot_config(m, 4096, 4096, groups == 2)
    c = compile_kernel(t._w4a16_dot_kernel, dict(
        GROUPS=groups, HAS_G_IDX=groups == 2, HAS_BIAS=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=True, UPCAST=False), ptrs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, aligned=True)
    print("dot", groups, m, report(c), ("wgmma" if m > 16 else "mma.sync") in c.asm["ptx"])
for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)):
    cfg = t.gemv_config(1, n, k)
    c = compile_kernel(t._w4a16_gemv_lean_kernel, dict(
        GROUPS=1, HAS_G_IDX=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=True, EVEN_N=True, PDL=True), ptrs, num_warps=cfg.num_warps, aligned=True)
    ptx = c.asm["ptx"]
    print("lean", n, k, report(c), cfg.lean and 0 <= ptx.find("ld.global") < ptx.find("griddepcontrol.wait"))
"""


@triton_in_process
def test_triton_lean_gemv_matches_the_reference() -> None:
    """`Int4GemvConfig(lean=True)` at one row: groups of whole words (a scale row per word or per
    key tile), sym and asym, N a multiple of the column tile (unmasked words) or not, K with a
    masked last key tile, bf16 and fp32 x, with and without a bias; act-order (a group per row)
    and more rows take the other GEMV."""
    from kernels.triton_int4_linear import Int4GemvConfig

    g = torch.Generator().manual_seed(11)
    lean = (Int4GemvConfig(block_n=8, block_k=64, num_warps=2, lean=True),
            Int4GemvConfig(block_n=4, block_k=128, num_warps=4, lean=True))
    cases = ((256, 48, 32, True), (256, 44, 64, False), (200, 40, 8, False), (128, 24, -1, True))
    for k, n, size, sym in cases:  # (K, N, group size, sym)
        w = Int4GroupWeight.quantize(weight_matrix(n, k, seed=k + n), size, sym=sym)
        w = Int4GroupWeight(*(t.to(DEVICE) for t in (w.qweight, w.scales, w.zeros)))
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
            bias = torch.randn(n, generator=g).to(DEVICE, dtype)
            for cfg in lean:
                check_kernel(w, x, bias if size == 32 else None, cfg)
    ordered = act_order(weight_matrix(24, 64), 8, sym=False, seed=3)
    ordered = Int4GroupWeight(*(t.to(DEVICE) for t in (ordered.qweight, ordered.scales, ordered.zeros, ordered.g_idx)))
    for m in (1, 3):
        check_kernel(ordered, torch.randn(m, 64, generator=g).to(DEVICE, torch.bfloat16), None, lean[0])
    plain = Int4GroupWeight.quantize(weight_matrix(24, 64).to(DEVICE), 32)
    check_kernel(plain, torch.randn(3, 64, generator=g).to(DEVICE, torch.bfloat16), None, lean[0])


def test_kernels_compile_for_sm90_without_spills() -> None:
    """The default tilings (and the GEMV's at 16 rows) at llama3-8b's o projection, the lean
    GEMV's at its four projections: no stack (spills), the GEMVs' first weight load issued before
    PDL's wait, the tensor-core kernel on wgmma (16-row tiles: mma.sync, wgmma's tiles have 64
    rows)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 15, proc.stdout
    for line in lines:
        assert "stack 0 B" in line and line.endswith("True"), line


# ---- on a GPU ----------------------------------------------------------------------------------------


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("ordered", [False, True], ids=["groups", "act_order"])
@pytest.mark.parametrize("proj", list(LLAMA3_8B))
def test_llama3_8b_shapes_match_the_reference_on_gpu(proj, ordered, monkeypatch) -> None:
    """bf16 activations at decode (1 row: the GEMV; 8: 16-row tensor-core tiles) and prefill
    (300 rows) sizes, group 128, symmetric, through `Int4GroupWeight` (the reference never
    called)."""
    n, k = LLAMA3_8B[proj]
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    w = act_order(weight, 128, sym=True) if ordered else Int4GroupWeight.quantize(weight, 128, sym=True)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    monkeypatch.setattr(int4_module, "w4a16_linear_ref", None)  # `w4a16_linear` must take the kernels
    for m in (1, 8, 300):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        for b in (None, bias):
            out = w(x, b)
            ref = w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, w.g_idx, b)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            assert _rel(out, ref) < 1e-2, (m, b is not None, _rel(out, ref))
            assert (out.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max(), (m, b is not None)


@pytest.mark.gpu
def test_fp16_asymmetric_odd_shapes_and_the_reference_paths_on_gpu(monkeypatch) -> None:
    """fp16, asymmetric zeros, N not a multiple of any tile, K of a masked last tile; fp32 x and
    PAGODA_KERNELS=torch take the reference."""
    g = torch.Generator(device="cuda").manual_seed(1)
    for n, k, size, ordered in ((100, 200, 40, False), (1000, 1096, 8, True), (300, 4096, -1, False)):
        weight = torch.randn(n, k, device="cuda", generator=g) * 0.05
        w = act_order(weight, size, sym=False) if ordered else Int4GroupWeight.quantize(weight, size, sym=False)
        w = Int4GroupWeight(w.qweight, w.scales.half(), w.zeros.half(), w.g_idx)
        bias = (torch.randn(n, device="cuda", generator=g) * 0.1).half()
        for m in (1, 5, 16, 17, 129):
            x = torch.randn(m, k, device="cuda", generator=g).half()
            check_kernel(w, x, bias)
            assert _rel(w(x, bias), w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, w.g_idx, bias)) < 2e-3
    x = torch.randn(4, k, device="cuda", generator=g)
    assert torch.equal(w(x), w4a16_linear_ref(x, w.qweight, w.scales, w.zeros, w.g_idx))
    monkeypatch.setattr(int4_module, "_USE_TRITON", False)
    assert torch.equal(w(x.half()), w4a16_linear_ref(x.half(), w.qweight, w.scales, w.zeros, w.g_idx))


@pytest.mark.gpu
@pytest.mark.parametrize("ordered", [False, True], ids=["groups", "act_order"])
def test_kernels_replay_in_a_cuda_graph(ordered) -> None:
    """Captured once per row count (the GEMV, the 16-row and the prefill tiles), replayed on new
    inputs copied into the captured buffer: the eager result, bit for bit."""
    n, k = LLAMA3_8B["o"]
    g = torch.Generator(device="cuda").manual_seed(2)
    weight = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    w = act_order(weight, 128, sym=True) if ordered else Int4GroupWeight.quantize(weight, 128, sym=True)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    for m in (1, 8, 300):
        static_x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            w(static_x, bias)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = w(static_x, bias)
        for _ in range(2):
            new = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
            static_x.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, w(new, bias)), m
            assert _rel(static_out, w4a16_linear_ref(new, w.qweight, w.scales, w.zeros, w.g_idx, bias)) < 1e-2
