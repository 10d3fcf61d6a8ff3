"""FP8 W8A8 linears (kernels/fp8_linear.py): the quantization's bounds, the reference matmul
against fp64 on the dequantized operands, the `_scaled_mm` call's conventions, and the Triton
quantization kernel (in Triton's interpreter and compiled for sm_90 here; on the GPU with
`-m gpu`, with `_scaled_mm` at llama3-8b's projection shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    Fp8Weight,
    dequantize,
    fp8_linear,
    fp8_linear_ref,
    quantize_rows_ref,
    scaled_mm_rowwise,
)

ROOT = Path(__file__).resolve().parents[2]
# e4m3: 3 mantissa bits, so rounding errs by at most 2^-4 of a normal value; below 2^-6 (the
# smallest normal) values are subnormal, spaced 2^-9 apart.
HALF_ULP = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def rows_with_outliers(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 1, m)[:, None]  # rows of very different sizes
    x[:, :: max(1, k // 7)] *= 20  # a few outliers per row
    return x.to(dtype)


# ---- quantization ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID)
def test_per_token_quantization_round_trips_within_half_an_e4m3_step(dtype) -> None:
    x = rows_with_outliers(9, 300, dtype)
    x[4] = 0  # an all-zero row: the floor scale, zeros out
    q, scale = quantize_rows_ref(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.shape == (9, 1) and scale.dtype == torch.float32
    xf = x.float()
    assert torch.equal(scale[:, 0], (xf.abs().amax(1) / FP8_MAX).clamp_min(MIN_SCALE))
    assert scale[4].item() == torch.tensor(MIN_SCALE).item() and not bits(q[4]).any()
    back = dequantize(q, scale)
    err = (back - xf).abs()
    assert bool((err <= torch.maximum(HALF_ULP * xf.abs(), SUBNORMAL_HALF_STEP * scale)).all())
    # Each row's largest |value| becomes +-448 exactly.
    assert bool((q.float().abs().amax(1)[[0, 1, 2, 3, 5, 6, 7, 8]] == FP8_MAX).all())


def test_static_scale_clamps_and_the_scale_bound_clips() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [1000.0, -3.0, 0.0]])
    q, scale = quantize_rows_ref(x, static_scale=torch.tensor(0.01))
    assert torch.equal(scale, torch.full((2, 1), 0.01))
    assert q.float().tolist() == [[96.0, -192.0, 48.0], [448.0, -288.0, 0.0]]  # 1000 / 0.01 clamps to 448
    q, scale = quantize_rows_ref(x, scale_ub=448.0)  # amax bounded by 448: scale at most 1
    assert torch.equal(scale[:, 0], torch.tensor([2.0 / 448, 1.0]))
    assert q[1].float().tolist() == [448.0, -3.0, 0.0]


def test_weight_quantization_has_a_scale_per_output_row() -> None:
    w = rows_with_outliers(24, 64)
    fp8 = Fp8Weight.quantize(w)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.scale.shape == (1, 24) and fp8.input_scale is None
    assert torch.equal(fp8.scale[0], w.abs().amax(1) / FP8_MAX)
    assert bool(((fp8.dequantize() - w).abs() <= torch.maximum(HALF_ULP * w.abs(), fp8.scale.t() / 1024)).all())
    assert fp8.nbytes == 24 * 64 + 4 * 24
    with pytest.raises(ValueError, match="float8_e4m3fn matrix, not torch.float32"):
        Fp8Weight(w, fp8.scale)
    with pytest.raises(ValueError, match="needs as many scales, not 23"):
        Fp8Weight(fp8.weight, fp8.scale[:, 1:])


# ---- the matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_reference_is_the_exact_product_of_the_dequantized_operands(static) -> None:
    x = rows_with_outliers(7, 96, seed=1).reshape(7, 1, 96)  # leading dims kept
    w = Fp8Weight.quantize(rows_with_outliers(40, 96, seed=2))
    bias = torch.randn(40)
    input_scale = torch.tensor(0.05) if static else None
    y = fp8_linear_ref(x, w.weight, w.scale, bias, input_scale)
    assert y.shape == (7, 1, 40) and y.dtype == torch.float32
    q, s = quantize_rows_ref(x.reshape(7, 96), input_scale)
    exact = dequantize(q, s).double() @ w.dequantize().double().t() + bias.double()
    assert torch.allclose(y.reshape(7, 40).double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # bf16 activations: the same product, rounded once to bf16 (within one bf16 step).
    yb = fp8_linear_ref(x.reshape(7, 96).bfloat16(), w.weight, w.scale, bias.bfloat16(), input_scale)
    q, s = quantize_rows_ref(x.reshape(7, 96).bfloat16(), input_scale)
    exact = dequantize(q, s).double() @ w.dequantize().double().t() + bias.bfloat16().double()
    assert yb.dtype == torch.bfloat16
    assert bool(((yb.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-30).all())


def test_fp8_weight_on_the_cpu_runs_the_reference() -> None:
    x = torch.randn(3, 5, 64)
    w = Fp8Weight.quantize(torch.randn(48, 64), )
    w.input_scale_ub = 1.5
    assert torch.equal(w(x), fp8_linear_ref(x, w.weight, w.scale, None, None, 1.5))
    assert torch.equal(fp8_linear(x, w.weight, w.scale), fp8_linear_ref(x, w.weight, w.scale))


def _cpu_scaled_mm_rowwise() -> bool:
    try:
        a = torch.zeros(2, 16, dtype=FP8_DTYPE)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_scaled_mm_rowwise(), reason="this torch has no row-wise _scaled_mm on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID)
def test_scaled_mm_call_matches_the_reference_where_torch_runs_it_on_the_cpu(dtype) -> None:
    """The GPU path's call (operand layout, scale shapes, bf16 product, bias fused or added) on
    torch's CPU implementation of _scaled_mm (recent torch has one)."""
    x = rows_with_outliers(5, 64, dtype, seed=3)
    w = Fp8Weight.quantize(torch.randn(32, 64))
    bias = torch.randn(32).to(dtype)
    q, s = quantize_rows_ref(x)
    y = scaled_mm_rowwise(q, s, w.weight, w.scale, bias, dtype)
    ref = fp8_linear_ref(x, w.weight, w.scale, bias)
    assert y.dtype == dtype
    # The product is rounded to bf16 (the bias fused, for bf16), then cast and the bias added.
    bound = 2.0**-8 * (ref.float().abs() + bias.float().abs()) + 1e-6 * ref.float().abs().max()
    assert bool(((y.float() - ref.float()).abs() <= bound).all())


# ---- the Triton kernel, here -----------------------------------------------------------------------

INTERPRETED = textwrap.dedent("""
    import torch
    from kernels.fp8_linear import FP8_MAX, quantize_rows_ref
    from kernels.triton_fp8_linear import quantize_rows_triton
    torch.manual_seed(0)
    for m, k in [(1, 64), (3, 100), (4, 5000)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(m, k) * torch.logspace(-2, 1, m)[:, None]).to(dtype)
            x[-1, :9] = 0
            for kw in ({}, {"scale_ub": 2.0}, {"static_scale": torch.tensor(0.01)}):
                # The values before the cast: Triton 3.9's interpreter casts to e4m3 wrongly (ties
                # away from zero, subnormals, a lost carry at powers of two); compiled, the cast
                # is cvt.rn.satfinite (the sm_90 test checks), bitwise equal on the GPU.
                v, s = quantize_rows_triton(x, **kw, out_dtype=torch.float32)
                _, sr = quantize_rows_ref(x, **kw)
                assert torch.equal(s, sr), (m, k, dtype, kw)
                assert torch.equal(v, (x.float() / sr).clamp(-FP8_MAX, FP8_MAX)), (m, k, dtype, kw)
    print("ok")
""")


def test_triton_kernel_in_the_interpreter_equals_the_reference() -> None:
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


COMPILED = textwrap.dedent("""
    import sys
    sys.path.insert(0, "scripts")
    from kernel_resources import compile_kernel, report
    from kernels import triton_fp8_linear as t
    from kernels.fp8_linear import FP8_MAX, MIN_SCALE
    for static, ub, k in ((False, False, 4096), (False, True, 14336), (True, False, 4096)):
        block, warps = t.block_and_warps(k)
        c = compile_kernel(
            t._quantize_rows_kernel,
            dict(STATIC=static, HAS_UB=ub, BLOCK=block, FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE),
            dict(x_ptr="bf16", q_ptr="fp8e4nv", scale_ptr="fp32", static_scale_ptr="fp32"),
            floats=("scale_ub",), num_warps=warps)
        ptx = c.asm["ptx"]
        print(static, ub, k, report(c), "div.rn.f32" in ptx, "cvt.rn.satfinite.e4m3x2.f32" in ptx)
""")


def test_triton_kernel_compiles_for_sm90_with_ieee_division_and_nearest_even_casts() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "stack 0 B" in line and line.endswith("True True"), line


# ---- on a GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID)
def test_triton_quantization_equals_the_reference_bit_for_bit_on_gpu(dtype) -> None:
    from kernels.triton_fp8_linear import quantize_rows_triton

    for m, k in [(1, 4096), (16, 4096), (512, 14336), (3, 100)]:
        x = rows_with_outliers(m, k, dtype).cuda()
        x[-1, :5] = 0
        for kw in ({}, {"scale_ub": 2.0}, {"static_scale": torch.tensor(0.02, device="cuda")}):
            q, s = quantize_rows_triton(x, **kw)
            qr, sr = quantize_rows_ref(x, **kw)
            assert torch.equal(s, sr), (m, k, kw)
            assert torch.equal(bits(q), bits(qr)), (m, k, kw)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("proj", list(LLAMA3_8B))
def test_scaled_mm_matches_the_reference_at_llama3_8b_shapes(proj, monkeypatch) -> None:
    """bf16 activations at decode (1..16 rows) and prefill (512 rows) sizes: `_scaled_mm` against
    the same quantized operands multiplied in fp32 and rounded to bf16 once."""
    n, k = LLAMA3_8B[proj]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = Fp8Weight.quantize(torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m in (1, 2, 7, 16, 512):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        for b in (None, bias):
            out = w(x, b)
            ref = fp8_linear_ref(x, w.weight, w.scale, b)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            assert _rel(out, ref) < 3e-3, (m, b is not None)
            assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max(), (m, b is not None)
    assert len(calls) == 10  # every call took _scaled_mm


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_ID)
def test_scaled_mm_for_other_activation_dtypes_static_scales_and_bounds(dtype) -> None:
    """fp16/fp32 models get the bf16 product cast (bias added after); a static input scale and
    fbgemm's bound go through the same path; odd shapes take the reference."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w = Fp8Weight.quantize(torch.randn(256, 512, device="cuda", generator=g) * 0.02)
    x = torch.randn(9, 512, device="cuda", generator=g).to(dtype)
    bias = (torch.randn(256, device="cuda", generator=g) * 0.1).to(dtype)
    for input_scale, ub in ((None, None), (torch.tensor(0.01, device="cuda"), None), (None, 1.0)):
        out = fp8_linear(x, w.weight, w.scale, bias, input_scale, ub)
        ref = fp8_linear_ref(x, w.weight, w.scale, bias, input_scale, ub)
        assert out.dtype == dtype and _rel(out, ref) < 5e-3
    odd = Fp8Weight.quantize(torch.randn(40, 72, device="cuda", generator=g))  # 72 inputs: no _scaled_mm
    xo = torch.randn(3, 72, device="cuda", generator=g).to(dtype)
    assert torch.equal(odd(xo), fp8_linear_ref(xo, odd.weight, odd.scale))
